"""The OpenAI-compatible HTTP API (FastAPI), served by uvicorn in the gateway's process.

Endpoints: POST /v1/chat/completions and /v1/completions (streaming or not), GET /v1/models,
POST /tokenize and /detokenize, and the open GET /health and /metrics. Requests become
`tandem.v1.GenerateRequest`s and run through the same `Frontend` as gRPC calls. API keys apply
as `Authorization: Bearer`; `X-Request-Id` is honoured and echoed; a client that disconnects
aborts its request. Errors use OpenAI's body {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from tandem.cluster.auth import ApiKeys
from tandem.cluster.errors import (
    ClusterError,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    UnknownModel,
    WorkerUnavailable,
)
from tandem.cluster.frontend import MAX_REQUEST_ID_LENGTH, Frontend
from tandem.cluster.openai import translate
from tandem.cluster.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    UnsupportedField,
    error_body,
)
from tandem.cluster.openai.responses import Shape, collect, stream_events
from tandem.cluster.streams import merge
from tandem.proto.v1 import tandem_pb2 as pb

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
REQUEST_ID_HEADER = "X-Request-Id"
DISCONNECT_POLL_S = 0.5


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def response(self, request_id: str | None = None) -> JSONResponse:
        headers = {REQUEST_ID_HEADER: request_id} if request_id else None
        return JSONResponse(error_body(str(self), self.kind, self.param, self.code),
                            status_code=self.status, headers=headers)


def http_error(error: Exception) -> HttpError:
    """A cluster error (or a deadline) as the HTTP status OpenAI clients expect."""
    if isinstance(error, UnknownModel):
        return HttpError(404, str(error), "invalid_request_error", "model", "model_not_found")
    if isinstance(error, InvalidRequest):
        return HttpError(400, str(error), "invalid_request_error", error.param)
    if isinstance(error, Overloaded):
        return HttpError(429, str(error), "rate_limit_error", None, "overloaded")
    if isinstance(error, WorkerUnavailable):
        return HttpError(503, str(error), "service_unavailable", None, "no_worker")
    if isinstance(error, PermissionDenied):
        return HttpError(403, str(error), "permission_error")
    if isinstance(error, TimeoutError):
        return HttpError(504, str(error), "timeout", None, "deadline_exceeded")
    return HttpError(500, str(error), "internal_error")


def build_app(frontend: Frontend, keys: ApiKeys, registry, cors_origins: list[str],
              is_draining: Callable[[], bool] = lambda: False) -> FastAPI:
    app = FastAPI(title="Tandem", docs_url=None, redoc_url=None, openapi_url=None)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=[REQUEST_ID_HEADER])
    renderer = translate.Renderer(frontend.tokenizer)
    model = frontend.model

    @app.exception_handler(HttpError)
    async def _on_http_error(request: Request, error: HttpError) -> JSONResponse:
        return error.response(request.headers.get(REQUEST_ID_HEADER))

    def caller_of(request: Request) -> str | None:
        try:
            return keys.caller((("authorization", request.headers.get("authorization")),)
                               if "authorization" in request.headers else ())
        except PermissionError as e:
            raise HttpError(401, str(e), "authentication_error", None,
                            "invalid_api_key") from None

    @app.get("/health")
    async def health() -> Response:
        if is_draining():
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        caller_of(request)
        return {"object": "list", "data": [{
            "id": model.id, "object": "model", "created": 0, "owned_by": "tandem",
            "max_model_len": model.max_model_len, "root": model.id}]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        caller_of(request)
        body = await parse(request, TokenizeRequest)
        _check_model(frontend, body.model)
        if body.messages is not None:
            greq = pb.GenerateRequest(messages=pb.ChatMessages(messages=[
                pb.ChatMessage(role=m.role, content=m.text()) for m in body.messages]))
            ids = await _off_loop(frontend.prepare, greq)
            ids = ids.prompt
        else:
            ids = await _off_loop(frontend.tokenizer.encode, body.prompt or "",
                                  add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": model.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        caller_of(request)
        body = await parse(request, DetokenizeRequest)
        _check_model(frontend, body.model)
        bad = next((t for t in body.tokens if t >= frontend.vocab_size), None)
        if bad is not None:
            raise HttpError(400, f"tokens: {bad} is outside the vocabulary "
                            f"[0, {frontend.vocab_size})", "invalid_request_error", "tokens")
        return {"prompt": await _off_loop(frontend.tokenizer.decode, body.tokens)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        caller = caller_of(request)
        body = await parse(request, ChatCompletionRequest)
        rid = request_id_of(request)
        greq = await _translated(translate.chat_request, body, rid)
        shape = Shape(True, f"chatcmpl-{rid}", model.id, body.n or 1, body.logprobs)
        return await run(request, rid, [greq], shape, caller, body.stream,
                         bool(body.stream_options and body.stream_options.include_usage))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        caller = caller_of(request)
        body = await parse(request, CompletionRequest)
        rid = request_id_of(request)
        greqs = await _translated(translate.completion_requests, body, rid)
        prepared = [await _off_loop(frontend.prepare, g, caller) for g in greqs]
        echo = [frontend.tokenizer.decode(p.prompt, skip_special_tokens=False)
                if not g.HasField("text") else g.text
                for g, p in zip(greqs, prepared, strict=True)] if body.echo else None
        shape = Shape(False, f"cmpl-{rid}", model.id, body.n or 1, body.logprobs is not None,
                      echo, [p.prompt[0] for p in prepared] if body.echo else None)
        return await run(request, rid, greqs, shape, caller, body.stream,
                         bool(body.stream_options and body.stream_options.include_usage),
                         prepared)

    async def run(request: Request, rid: str, greqs: list[pb.GenerateRequest], shape: Shape,
                  caller: str | None, stream: bool, include_usage: bool,
                  prepared: list | None = None) -> Response:
        if prepared is None:
            prepared = [await _off_loop(frontend.prepare, g, caller) for g in greqs]
        messages = merge([frontend.stream(p) for p in prepared])
        headers = {REQUEST_ID_HEADER: rid}
        if not stream:
            body = await _until_disconnect(request, collect(shape, messages, renderer))
            return JSONResponse(body, headers=headers)
        events = stream_events(shape, include_usage, messages, renderer)
        try:  # the first event before the headers, so admission errors get their status
            first = await anext(events)
        except Exception as e:
            await events.aclose()
            raise http_error(e) from None
        return StreamingResponse(_resumed(first, events), media_type="text/event-stream",
                                 headers=headers)

    return app


async def parse(request: Request, model: type[M]) -> M:
    """The JSON body as `model`; a 400 naming the first bad field."""
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HttpError(400, f"the body is not valid JSON: {e}", "invalid_request_error") \
            from None
    if not isinstance(data, dict):
        raise HttpError(400, "the body must be a JSON object", "invalid_request_error")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, UnsupportedField):
            raise HttpError(400, str(cause), "invalid_request_error", cause.param) from None
        loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-",)))
        message = first["msg"].removeprefix("Value error, ")
        param = loc or InvalidRequest(message).param
        raise HttpError(400, f"{loc}: {message}" if loc else message,
                        "invalid_request_error", param) from None


def request_id_of(request: Request) -> str:
    rid = request.headers.get(REQUEST_ID_HEADER)
    if rid is None:
        return uuid.uuid4().hex
    if not rid or len(rid) > MAX_REQUEST_ID_LENGTH - 4 or not rid.isprintable():
        raise HttpError(400, f"{REQUEST_ID_HEADER}: must be 1 to {MAX_REQUEST_ID_LENGTH - 4} "
                        "printable characters", "invalid_request_error", REQUEST_ID_HEADER)
    return rid


def _check_model(frontend: Frontend, name: str) -> None:
    try:
        frontend.check_model(name)
    except InvalidRequest as e:
        raise http_error(e) from None


async def _translated(fn: Callable[..., Any], body: Any, rid: str) -> Any:
    try:
        return fn(body, rid)
    except ValueError as e:
        raise http_error(InvalidRequest(str(e))) from None


async def _off_loop(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Tokenizing is CPU work: off the event loop that carries every stream."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except (ClusterError, TimeoutError) as e:
        raise http_error(e) from None


async def _until_disconnect(request: Request, work) -> Any:
    """Run `work`; if the client goes away first, cancel it (which aborts the request)."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                raise HttpError(499, "the client disconnected", "client_closed_request")
        return task.result()
    except (ClusterError, TimeoutError) as e:
        raise http_error(e) from None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _resumed(first: str, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The stream after its first event; an error mid-stream becomes an error event (the
    status line is gone by then). Closing this (client gone) closes the frontend's streams."""
    try:
        yield first
        async for event in events:
            yield event
    except (ClusterError, TimeoutError) as e:
        error = http_error(e)
        yield "data: " + json.dumps(error_body(str(error), error.kind, error.param,
                                               error.code)) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()
