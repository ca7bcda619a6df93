"""The gateway: the public gRPC service (`tandem.v1.Tandem`) in front of the router.

It checks the caller's API key, validates requests (INVALID_ARGUMENT naming the field; every
input bounded), applies deadlines, turns token deltas into text, and ends each stream with usage
and timings. Tokenizing and chat templating run on worker threads, never on the event loop that
carries every stream. Cluster errors map to status codes here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from tandem.cluster.auth import ApiKeys
from tandem.cluster.config import GatewayConfig
from tandem.cluster.errors import (
    ClusterError,
    HandoffFailed,
    InvalidRequest,
    Overloaded,
    WorkerUnavailable,
)
from tandem.cluster.router import RoutedRequest, Router
from tandem.cluster.wire import reject_unparsable
from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.segments import DEFAULT_RECOMPUTE_RATIO, SegmentedPrompt
from tandem.engine.tokenizer import Tokenizer
from tandem.proto.v1 import tandem_pb2 as pb
from tandem.proto.v1 import tandem_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant", "tool")
DEFAULT_MAX_TOKENS = 16  # when a request sets none (clamped to the context left)
MAX_MESSAGES = 1024
MAX_REQUEST_ID_LENGTH = 128
# gRPC metadata that pins a request to one prefill worker (by index): honoured only with
# `debug_routing`, for tests and debugging.
PREFILL_WORKER_KEY = "x-tandem-prefill-worker"


def status_of(error: ClusterError) -> grpc.StatusCode:
    if isinstance(error, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, WorkerUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, HandoffFailed) and error.corrupted:
        return grpc.StatusCode.DATA_LOSS
    return grpc.StatusCode.INTERNAL


class Gateway(pb_grpc.TandemServicer):
    def __init__(self, router: Router, tokenizer: Tokenizer, model: pb.ModelInfo,
                 vocab_size: int, config: GatewayConfig) -> None:
        self.router, self.tokenizer, self.model = router, tokenizer, model
        self.vocab_size, self.config = vocab_size, config
        self.request_timeout_s = config.request_timeout_s
        self.keys = ApiKeys(config.api_keys)
        self._owners: dict[str, str | None] = {}  # running request -> its caller's key digest

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) \
            -> AsyncIterator[pb.GenerateResponse]:
        received = time.perf_counter()
        caller = await self.keys.check(context)
        await reject_unparsable(request, context)
        try:
            req = await asyncio.to_thread(self._routed, request)
            req.prefill_worker = self._prefill_hint(context)
            if req.request_id in self._owners:
                raise InvalidRequest(f"request_id: {req.request_id!r} is already running")
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self._owners[req.request_id] = caller
        try:  # aclosing: a cancelled call (client gone) closes the router's stream at once
            async with contextlib.aclosing(self._generate(req, received, context)) as replies:
                async for reply in replies:
                    yield reply
        finally:
            self._owners.pop(req.request_id, None)

    async def _generate(self, req: RoutedRequest, received: float,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        remaining = context.time_remaining()  # the client's deadline, when it set one
        timeout = self.request_timeout_s if remaining is None else remaining
        deadline = received + timeout
        detok = IncrementalDetokenizer(self.tokenizer, req.params.stop)
        stream = self.router.generate(req)
        ttft = None
        num_tokens = 0
        try:
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise TimeoutError
                try:
                    delta = await asyncio.wait_for(anext(stream), left)
                except StopAsyncIteration:
                    break
                num_tokens += len(delta.token_ids)
                done = delta.finish_reason is not None
                reply = pb.GenerateResponse(
                    request_id=req.request_id, token_ids=delta.token_ids,
                    text=detok.add(delta.token_ids, delta.text if done else None))
                if ttft is None and delta.token_ids:
                    ttft = time.perf_counter() - received
                if done:
                    reply.finish_reason = delta.finish_reason
                    reply.usage.CopyFrom(pb.Usage(
                        prompt_tokens=len(req.prompt_token_ids), completion_tokens=num_tokens,
                        cached_tokens=req.num_cached_tokens,
                        recomputed_tokens=req.num_recomputed_tokens))
                    reply.timings.CopyFrom(pb.Timings(
                        ttft_s=ttft or 0.0, total_s=time.perf_counter() - received,
                        queue_s=req.queue_s,
                        prefill_s=req.prefill.prefill_s if req.prefill else 0.0,
                        handoff_s=req.prefill.handoff_s if req.prefill else 0.0))
                yield reply
                if done:
                    return
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"request {req.request_id}: deadline of {timeout:.3g} s exceeded")
        except ClusterError as e:
            logger.info("request %s failed: %s", req.request_id, e)
            await context.abort(status_of(e), f"request {req.request_id}: {e}")
        finally:  # also on abort above: the router then frees the request's blocks
            await stream.aclose()
        await context.abort(grpc.StatusCode.INTERNAL, "stream ended without a finish_reason")

    def _prefill_hint(self, context: grpc.aio.ServicerContext) -> int | None:
        for key, value in context.invocation_metadata() or ():
            if key != PREFILL_WORKER_KEY:
                continue
            if not self.config.debug_routing:
                raise InvalidRequest(f"{PREFILL_WORKER_KEY}: routing hints are honoured only "
                                     "when the gateway runs with --debug-routing")
            try:
                return int(value)
            except ValueError:
                raise InvalidRequest(f"{PREFILL_WORKER_KEY}: {value!r} is not an integer") \
                    from None
        return None

    def _routed(self, request: pb.GenerateRequest) -> RoutedRequest:
        """Validate and tokenize a request (on a worker thread: tokenizing is CPU work)."""
        self._check_model(request.model)
        rid = request.request_id
        if len(rid) > MAX_REQUEST_ID_LENGTH or not rid.isprintable():
            raise InvalidRequest(f"request_id: must be at most {MAX_REQUEST_ID_LENGTH} "
                                 "printable characters")
        prompt, segments = self._prompt(request)
        s = request.sampling
        left = self.model.max_model_len - len(prompt)  # _prompt left at least one
        if s.HasField("max_tokens") and s.max_tokens > left:
            raise InvalidRequest(
                f"max_tokens: {s.max_tokens} exceeds the {left} tokens the context of "
                f"{self.model.max_model_len} has left after the {len(prompt)}-token prompt")
        try:
            params = SamplingParams(
                max_tokens=s.max_tokens if s.HasField("max_tokens")
                else min(DEFAULT_MAX_TOKENS, left),
                temperature=s.temperature if s.HasField("temperature") else 1.0,
                top_p=s.top_p if s.HasField("top_p") else 1.0,
                top_k=s.top_k if s.HasField("top_k") else 0,
                seed=s.seed if s.HasField("seed") else None,
                stop=list(s.stop) or None, ignore_eos=s.ignore_eos,
                cache_salt=s.cache_salt if s.HasField("cache_salt") else None)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        return RoutedRequest(request.request_id or uuid.uuid4().hex, prompt, params,
                             segments=segments)

    def _check_model(self, model: str) -> None:
        if model and model != self.model.id:
            raise InvalidRequest(f"model: unknown model {model!r}; this gateway serves "
                                 f"{self.model.id!r}")

    def _prompt(self, request: pb.GenerateRequest) \
            -> tuple[list[int], SegmentedPrompt | None]:
        """The prompt's token ids, and its segments when it came as `segments`."""
        kind = request.WhichOneof("input")
        segments = None
        if kind is None:
            raise InvalidRequest("prompt: missing; set text, token_ids, messages or segments")
        if kind == "text":
            ids = self.tokenizer.encode(request.text) if request.text else []
        elif kind == "token_ids":
            ids = list(request.token_ids.ids)
            bad = next((t for t in ids if t >= self.vocab_size), None)
            if bad is not None:
                raise InvalidRequest(f"prompt: token id {bad} is outside the vocabulary "
                                     f"[0, {self.vocab_size})")
        elif kind == "segments":
            segments = _segmented(self.tokenizer, request.segments)
            ids = segments.token_ids
        else:
            ids = self._chat(request.messages.messages)
        if not ids:
            raise InvalidRequest(f"prompt: {kind} is empty")
        limit = self.model.max_model_len
        if len(ids) >= limit:
            raise InvalidRequest(f"prompt: {len(ids)} tokens leave no room to generate within "
                                 f"the context of {limit} tokens")
        return ids, segments

    def _chat(self, messages) -> list[int]:
        if not messages:
            return []
        if len(messages) > MAX_MESSAGES:
            raise InvalidRequest(f"messages: {len(messages)} messages; at most {MAX_MESSAGES}")
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequest(f"messages[{i}].role: {m.role!r} is not one of "
                                     f"{', '.join(CHAT_ROLES)}")
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) \
            -> pb.TokenizeResponse:
        await self.keys.check(context)
        await reject_unparsable(request, context)
        try:
            self._check_model(request.model)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if not request.text:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text: is empty")
        ids = await asyncio.to_thread(self.tokenizer.encode, request.text,
                                      add_special_tokens=request.add_special_tokens)
        return pb.TokenizeResponse(token_ids=ids)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        await self.keys.check(context)
        await reject_unparsable(request, context)
        return pb.ListModelsResponse(models=[self.model])

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) \
            -> pb.AbortResponse:
        caller = await self.keys.check(context)
        await reject_unparsable(request, context)
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: is empty")
        if request.request_id in self._owners and self._owners[request.request_id] != caller:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"request {request.request_id} was made with another API key")
        try:
            found = await self.router.abort(request.request_id)
        except ClusterError as e:
            await context.abort(status_of(e), str(e))
        return pb.AbortResponse(found=found)


def _segmented(tokenizer: Tokenizer, segments: pb.Segments) -> SegmentedPrompt:
    """Tokenize a `segments` input segment by segment; unset options take their defaults."""
    try:
        return SegmentedPrompt.tokenize(
            tokenizer, list(segments.texts),
            round(segments.recompute_ratio, 6) if segments.HasField("recompute_ratio")
            else DEFAULT_RECOMPUTE_RATIO,
            segments.blend if segments.HasField("blend") else True)
    except ValueError as e:  # the message names a segment or an option
        message = str(e)
        raise InvalidRequest(message if message.startswith("segments")
                             else f"segments.{message}") from None



