"""The HTTP backend: OpenAI-compatible `POST /v1/completions`, streamed, through httpx.

Each request is `{"model", "prompt": [token ids], "max_tokens", "temperature": 0,
"ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}`. The reply is
SSE: one event per token whose `choices[0].text` may be empty (a partial UTF-8 character is held
back), so every event with a choice counts as a token event whatever its text; the last choice
carries `finish_reason`; then an event with `"choices": []` and `usage`; then `data: [DONE]`.
TTFT ends at the first event with a choice, TPOT spans the first to the last such event, and
usage's `completion_tokens` is the token count (events are counted if usage never comes).

A failed request is recorded as "HTTP <status>" with the message of the body's
`{"error": {"message", ...}}`, "stream: <code>" for an error event inside the stream,
"INCOMPLETE" for a stream that ended without a finish_reason, "TIMEOUT" past `timeout`, or the
httpx exception's name (e.g. "ConnectError").
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from types import TracebackType
from typing import Any

import httpx

from tandem.loadgen.backend import RequestResult, ServedModel
from tandem.loadgen.sse import SSEDecoder
from tandem.loadgen.workload import Request

LIST_MODELS_TIMEOUT_S = 30.0
DONE = "[DONE]"


class HttpBackend:
    """Sends to an OpenAI-compatible server at `base_url` (e.g. "http://127.0.0.1:8000").

    Requests name `model`; when it is None, call served_model() first, which picks the
    server's first model."""

    name = "http"

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        model: str | None = None,
        verify: ssl.SSLContext | bool = True,
        transport: httpx.AsyncBaseTransport | None = None,  # e.g. httpx.MockTransport in tests
    ) -> None:
        # "http://host:8000/v1" (the OpenAI SDK's spelling) means the same server
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model = model  # filled in by served_model() when None
        self._timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # no per-read or pool timeout: a request may queue for minutes behind a busy server; the
        # whole-request deadline below is the only limit, and the pool never makes one wait
        self._client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, verify=verify, timeout=httpx.Timeout(None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            transport=transport)

    async def served_model(self) -> ServedModel:
        response = await self._client.get("/v1/models", timeout=LIST_MODELS_TIMEOUT_S)
        if response.status_code != 200:
            raise RuntimeError(f"GET {self.base_url}/v1/models: HTTP {response.status_code}: "
                               f"{error_message(response.content)}")
        models: list[dict[str, Any]] = response.json().get("data") or []
        if not models:
            raise RuntimeError(f"{self.base_url} lists no model")
        match = [m for m in models if self.model is None or m.get("id") == self.model]
        if not match:
            raise RuntimeError(f"{self.base_url} serves "
                               f"{', '.join(str(m.get('id')) for m in models)}, not {self.model}")
        self.model = str(match[0]["id"])
        return ServedModel(self.model, match[0].get("max_model_len") or None)

    async def send(self, request: Request) -> RequestResult:
        result = RequestResult(request.max_tokens, prompt_tokens=len(request.prompt))
        body: dict[str, Any] = {
            "prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if self.model is not None:
            body = {"model": self.model, **body}
        content = json.dumps(body).encode()  # encoded before the clock starts
        result.send = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout), self._client.stream(
                    "POST", "/v1/completions", content=content,
                    headers={"Content-Type": "application/json"}) as response:
                if response.status_code != 200:
                    await response.aread()
                    result.fail(f"HTTP {response.status_code}", error_message(response.content))
                else:
                    await read_stream(response, result)
        except TimeoutError:
            result.fail("TIMEOUT", f"no complete response within {self._timeout} s")
        except Exception as e:  # a benchmark reports a broken request instead of crashing
            result.fail(type(e).__name__, str(e) or repr(e))
        result.end = time.perf_counter()
        return result

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> HttpBackend:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()


async def read_stream(response: httpx.Response, result: RequestResult) -> None:
    """Time the SSE events of a 200 response into `result`."""
    decoder = SSEDecoder()
    stopped = False
    async for chunk in response.aiter_bytes():
        now = time.perf_counter()
        if any(apply_event(payload, now, result) for payload in decoder.feed(chunk)):
            stopped = True  # the server may keep the connection open; nothing more is ours
            break
    if not stopped:
        now = time.perf_counter()
        for payload in decoder.close():
            if apply_event(payload, now, result):
                break
    if result.ok and result.finish_reason is None:
        result.fail("INCOMPLETE", "the stream ended without a finish_reason")


def apply_event(payload: str, now: float, result: RequestResult) -> bool:
    """Record one event's data received at `now`; True when the stream is over ([DONE] or an
    error event)."""
    if payload == DONE:
        return True
    event = json.loads(payload)
    if "error" in event:
        error = event["error"] if isinstance(event["error"], dict) else {"message": event["error"]}
        code = error.get("code") or error.get("type") or "error"
        result.fail(f"stream: {code}", str(error.get("message")))
        return True
    if event.get("choices"):
        if result.first is None:
            result.first = now
        result.last = now
        result.completion_tokens += 1
        result.finish_reason = event["choices"][0].get("finish_reason") or result.finish_reason
    if event.get("usage"):
        result.prompt_tokens = event["usage"]["prompt_tokens"]
        result.completion_tokens = event["usage"]["completion_tokens"]
    return False


def error_message(body: bytes) -> str:
    """The message of an OpenAI error body, or the start of whatever the body is."""
    try:
        error = json.loads(body)["error"]
        return str(error["message"]) if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")
