"""`Frontend`: what both public APIs share, whatever the wire (gRPC or OpenAI HTTP).

A request arrives as a `tandem.v1.GenerateRequest` (the HTTP API translates into one, so the two
APIs cannot drift). `prepare` validates and tokenizes it (on a worker thread: tokenizing is CPU
work) into one routed request per choice; `stream` runs the choices, turns their token deltas
into `GenerateResponse` messages (text, logprobs, and on each choice's last message its usage
and timings) and records the request's metrics. Errors are cluster errors (`cluster/errors.py`);
each API maps them to its own codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from tandem.cluster.config import GatewayConfig
from tandem.cluster.errors import (
    ClusterError,
    InvalidRequest,
    PermissionDenied,
    UnknownModel,
    WorkerUnavailable,
)
from tandem.cluster.metrics import ClusterMetrics
from tandem.cluster.prompts import build_prompt
from tandem.cluster.router import RoutedRequest, Router
from tandem.cluster.streams import merge
from tandem.decode_worker.worker import TokenDelta
from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.sampler import TokenLogprobs
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.segments import SegmentedPrompt
from tandem.engine.tokenizer import Tokenizer
from tandem.proto.v1 import tandem_pb2 as pb

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # when a completion sets none (clamped to the context left)
MAX_CHOICES = 16
MAX_REQUEST_ID_LENGTH = 128


@dataclass
class Prepared:
    """A validated request: one routed request per choice."""

    request_id: str
    prompt: list[int]
    choices: list[RoutedRequest]
    prompt_logprobs: int | None
    received: float
    deadline: float
    timeout_s: float
    caller: str | None = None
    segments: SegmentedPrompt | None = field(default=None, repr=False)


class Frontend:
    def __init__(self, router: Router, tokenizer: Tokenizer, model: pb.ModelInfo,
                 vocab_size: int, config: GatewayConfig, metrics: ClusterMetrics) -> None:
        self.router, self.tokenizer, self.model = router, tokenizer, model
        self.draining = False  # shutting down: new requests are refused (UNAVAILABLE, 503)
        self.vocab_size, self.config, self.metrics = vocab_size, config, metrics
        self._owners: dict[str, str | None] = {}  # running request -> its caller's key digest
        self._choice_ids: dict[str, list[str]] = {}  # running request -> its choices' ids
        # Tokens (prompt + output) the smallest decode worker's KV pool can hold, when known:
        # a chat answer's default length stays within it.
        self.kv_capacity_tokens: int | None = None
        metrics.num_waiting = lambda: router.num_queued
        metrics.num_resumed = lambda: router.num_resumed
        metrics.num_migrated = lambda: router.num_migrated
        metrics.num_offloaded = lambda: router.num_offloaded

    # -- admission -----------------------------------------------------------------------------

    def prepare(self, request: pb.GenerateRequest, caller: str | None = None,
                timeout_s: float | None = None, prefill_worker: int | None = None) -> Prepared:
        """Validate and tokenize; raises InvalidRequest naming the field."""
        received = time.perf_counter()
        self.check_model(request.model)
        rid = request.request_id
        if len(rid) > MAX_REQUEST_ID_LENGTH or not rid.isprintable():
            raise InvalidRequest(f"request_id: must be at most {MAX_REQUEST_ID_LENGTH} "
                                 "printable characters")
        rid = rid or uuid.uuid4().hex
        prompt, segments = build_prompt(self.tokenizer, request, self.vocab_size,
                                        self.model.max_model_len)
        params, n = self._params(request.sampling, len(prompt),
                                 chat=request.WhichOneof("input") == "messages")
        s = request.sampling
        if s.HasField("prompt_logprobs") and not 0 <= s.prompt_logprobs <= 20:
            raise InvalidRequest(f"prompt_logprobs: {s.prompt_logprobs} is not in [0, 20]")
        seed = params.seed
        if n > 1 and seed is None:  # choices must differ, and choice i uses seed + i
            seed = random.getrandbits(62)
        choices = [RoutedRequest(rid if n == 1 else f"{rid}#{i}", prompt,
                                 params if n == 1 else replace(params, seed=seed + i),
                                 segments=segments, prefill_worker=prefill_worker)
                   for i in range(n)]
        timeout = timeout_s if timeout_s is not None else self.config.request_timeout_s
        return Prepared(rid, prompt, choices,
                        s.prompt_logprobs if s.HasField("prompt_logprobs") else None,
                        received, received + timeout, timeout, caller, segments)

    def _params(self, s: pb.SamplingOptions, prompt_len: int, chat: bool) \
            -> tuple[SamplingParams, int]:
        left = self.model.max_model_len - prompt_len  # build_prompt left at least one
        # Unset max_tokens: a chat answer may use the rest of the context (it ends at EOS), as
        # in OpenAI's chat API and vLLM; a completion gets 16 tokens, OpenAI's default there.
        default_max_tokens = left if chat else min(DEFAULT_MAX_TOKENS, left)
        if chat and self.kv_capacity_tokens is not None:
            default_max_tokens = max(1, min(default_max_tokens,
                                            self.kv_capacity_tokens - prompt_len))
        if s.HasField("max_tokens") and s.max_tokens > left:
            raise InvalidRequest(
                f"max_tokens: {s.max_tokens} exceeds the {left} tokens the context of "
                f"{self.model.max_model_len} has left after the {prompt_len}-token prompt")
        n = s.n if s.HasField("n") else 1
        if not 1 <= n <= MAX_CHOICES:
            raise InvalidRequest(f"n: {n} is not in [1, {MAX_CHOICES}]")
        bad = next((t for t in s.stop_token_ids if t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"stop_token_ids: {bad} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")

        def get(name: str, default):
            return getattr(s, name) if s.HasField(name) else default

        try:
            return SamplingParams(
                max_tokens=get("max_tokens", default_max_tokens),
                temperature=get("temperature", 1.0), top_p=get("top_p", 1.0),
                top_k=get("top_k", 0), seed=get("seed", None), stop=list(s.stop) or None,
                stop_token_ids=list(s.stop_token_ids) or None, ignore_eos=s.ignore_eos,
                min_tokens=get("min_tokens", 0), logprobs=get("logprobs", None),
                presence_penalty=get("presence_penalty", 0.0),
                frequency_penalty=get("frequency_penalty", 0.0),
                repetition_penalty=get("repetition_penalty", 1.0),
                cache_salt=get("cache_salt", None)), n
        except ValueError as e:
            raise InvalidRequest(str(e)) from None

    def check_model(self, model: str) -> None:
        if model and model != self.model.id:
            raise UnknownModel(f"model: unknown model {model!r}; this gateway serves "
                               f"{self.model.id!r}")

    # -- running -------------------------------------------------------------------------------

    async def stream(self, prepared: Prepared) -> AsyncIterator[pb.GenerateResponse]:
        """Run every choice; their messages interleave (each names its choice in `index`).
        Raises ClusterError, or TimeoutError at the deadline."""
        rid = prepared.request_id
        if self.draining:
            raise WorkerUnavailable("the gateway is shutting down: it takes no new request "
                                    "while its running ones finish")
        if rid in self._owners:
            raise InvalidRequest(f"request_id: {rid!r} is already running")
        self._owners[rid] = prepared.caller
        self._choice_ids[rid] = [c.request_id for c in prepared.choices]
        self.metrics.labels(self.metrics.requests_received).inc()
        self.metrics.labels(self.metrics.prompt_tokens_received).inc(len(prepared.prompt))
        try:
            prompt_logprobs = None
            if prepared.prompt_logprobs is not None:
                prompt_logprobs = await self.router.prompt_logprobs(
                    prepared.prompt, prepared.prompt_logprobs,
                    max(prepared.deadline - time.perf_counter(), 0.001))
            if len(prepared.choices) == 1:
                async with contextlib.aclosing(self._choice(prepared, 0, prompt_logprobs)) as it:
                    async for message in it:
                        yield message
            else:
                choices = [self._choice(prepared, i, prompt_logprobs)
                           for i in range(len(prepared.choices))]
                async with contextlib.aclosing(merge(choices)) as it:
                    async for _, message in it:
                        yield message
        except TimeoutError:
            self.metrics.labels(self.metrics.request_failure, "deadline_exceeded").inc()
            raise
        except ClusterError as e:
            self.metrics.labels(self.metrics.request_failure, type(e).__name__).inc()
            logger.info("request %s failed: %s", rid, e)
            raise
        finally:
            self._owners.pop(rid, None)
            self._choice_ids.pop(rid, None)

    async def _choice(self, prepared: Prepared, index: int,
                      prompt_logprobs: list[TokenLogprobs] | None) \
            -> AsyncIterator[pb.GenerateResponse]:
        req = prepared.choices[index]
        detok = IncrementalDetokenizer(self.tokenizer, req.params.stop)
        deltas = self.router.generate(req)
        ttft: float | None = None
        last_token_at = 0.0
        num_tokens = 0
        try:
            while True:
                left = prepared.deadline - time.perf_counter()
                if left <= 0:
                    raise TimeoutError(f"request {prepared.request_id}: deadline of "
                                       f"{prepared.timeout_s:.3g} s exceeded")
                try:
                    delta = await asyncio.wait_for(anext(deltas), left)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise TimeoutError(f"request {prepared.request_id}: deadline of "
                                       f"{prepared.timeout_s:.3g} s exceeded") from None
                now = time.perf_counter()
                done = delta.finish_reason is not None
                text = detok.add(delta.token_ids, delta.text if done else None)
                if done and delta.text is None:  # resumed elsewhere: no engine has it all
                    text += detok.finish()
                reply = pb.GenerateResponse(
                    request_id=prepared.request_id, index=index, token_ids=delta.token_ids,
                    text=text)
                if delta.logprobs is not None:
                    reply.logprobs.extend(_token_logprobs(delta))
                if delta.token_ids:
                    if ttft is None:
                        ttft = now - prepared.received
                        if prompt_logprobs is not None:
                            reply.prompt_logprobs.extend(
                                _to_proto(t, lp) for t, lp in
                                zip(prepared.prompt[1:], prompt_logprobs, strict=True))
                    else:
                        gap = (now - last_token_at) / len(delta.token_ids)
                        for _ in delta.token_ids:
                            self.metrics.labels(self.metrics.itl).observe(gap)
                    last_token_at = now
                num_tokens += len(delta.token_ids)
                if done:
                    self._finish(reply, prepared, index, req, ttft, num_tokens, delta)
                yield reply
                if done:
                    return
        finally:  # also on an error or a cancelled call: the router then frees the blocks
            await deltas.aclose()
        raise ClusterError("the stream ended without a finish_reason")

    def _finish(self, reply: pb.GenerateResponse, prepared: Prepared, index: int,
                req: RoutedRequest, ttft: float | None, num_tokens: int,
                delta: TokenDelta) -> None:
        """The last message's usage and timings; the request's metrics."""
        total = time.perf_counter() - prepared.received
        reply.finish_reason = delta.finish_reason or ""
        reply.usage.CopyFrom(pb.Usage(
            prompt_tokens=len(req.prompt_token_ids), completion_tokens=num_tokens,
            cached_tokens=req.num_cached_tokens, recomputed_tokens=req.num_recomputed_tokens))
        prefill = req.prefill
        reply.timings.CopyFrom(pb.Timings(
            ttft_s=ttft or 0.0, total_s=total, queue_s=req.queue_s,
            prefill_s=prefill.prefill_s if prefill else 0.0,
            handoff_s=prefill.handoff_s if prefill else 0.0))
        m = self.metrics
        m.labels(m.request_success, reply.finish_reason).inc()
        m.labels(m.e2e).observe(total)
        m.labels(m.queue_time).observe(req.queue_s)
        m.labels(m.generation_tokens).inc(num_tokens)
        m.labels(m.generation_tokens_hist).observe(num_tokens)
        if ttft is not None:
            m.labels(m.ttft).observe(ttft)
        if prefill is not None:
            m.labels(m.prefill_time).observe(prefill.prefill_s)
            mode = "layerwise" if prefill.layerwise else "onepiece"
            m.labels(m.handoff_bytes, prefill.transport, mode).inc(prefill.handoff_bytes)
            m.labels(m.handoff_seconds, prefill.transport, mode).observe(prefill.handoff_s)
        if index == 0:  # the prompt is shared by the choices: count it once
            n = len(req.prompt_token_ids)
            m.labels(m.prompt_tokens).inc(n)
            m.labels(m.prompt_tokens_hist).observe(n)
            m.labels(m.prefix_cache_queries).inc(n)
            m.labels(m.prefix_cache_hits).inc(req.num_cached_tokens)
            if req.segments is not None:
                m.labels(m.blend_recomputed_tokens).inc(req.num_recomputed_tokens)
                m.labels(m.blend_cached_tokens).inc(req.num_cached_tokens)

    async def abort(self, request_id: str, caller: str | None) -> bool:
        """Abort a running request (all its choices); only its owner's key may."""
        if request_id in self._owners and self._owners[request_id] != caller:
            raise PermissionDenied(f"request {request_id} was made with another API key")
        found = False
        for choice_id in self._choice_ids.get(request_id, [request_id]):
            found = await self.router.abort(choice_id) or found
        return found


def _to_proto(token_id: int, lp: TokenLogprobs) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=token_id, logprob=lp.logprob,
                           top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def _token_logprobs(delta: TokenDelta) -> list[pb.TokenLogprob]:
    out = []
    for token, lp in zip(delta.token_ids, delta.logprobs or (), strict=False):
        if lp is None:  # the prefill worker's result never came (aborted): report nothing
            return []
        out.append(_to_proto(token, lp))
    return out
