"""`PrefillWorker`: compute a prompt and its first token while its KV streams to a decode worker.

A request's lifecycle here, as queues:
    looking up (the longest cached prefix is loaded from the KV store, off the engine thread)
    -> blending (a segmented prompt's cached chunks, on the engine thread) -> waiting (in the
    engine's queue) -> prefilling (chunked, in the batch; layer-wise, each layer's KV is posted
    to the transport as soon as it is computed) -> prefilled (the first token is sampled;
    whatever was not sent yet is posted, on the engine thread) -> finishing (the transport
    waits for every WRITE, then the decode worker confirms) -> done.
The request's blocks stay held until its transfer is over, since the transport reads them in
place; whatever happens, they are freed when `prefill` returns or raises. After a handoff, the
prompt's new whole chunks (of its exact part: not past a blended chunk) are copied out of the
blocks and written to the store in the background (`kv_reuse.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from tandem.engine.blend import BlendResult
from tandem.engine.chunk_reuse_stats import ChunkReuseSnapshot
from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.errors import OutOfBlocksError
from tandem.engine.kv_cache import KVBlocks
from tandem.engine.loader import LoadedModel
from tandem.engine.outputs import RequestOutput
from tandem.engine.sampler import TokenLogprobs
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.segments import SegmentedPrompt
from tandem.kv_store.codec import Codec
from tandem.kv_store.config import open_store
from tandem.kv_store.index_log import IndexDelta
from tandem.prefill_worker.coding import wire_coding
from tandem.prefill_worker.kv_reuse import KVReuse
from tandem.prefill_worker.streamer import LayerStreamer
from tandem.transfer import TransportNotUsable, available_transports, make_transport
from tandem.transfer.base import Handoff, KVTarget, KVTransport, ReceiverInfo, SendSession
from tandem.transfer.coded_piece import AdaptiveCoding
from tandem.transfer.introductions import Introductions
from tandem.transfer.ranges import RangedSession, RangeTarget, check_ranges
from tandem.worker_base import EngineWorker, WorkerConfig, WorkerInfo

logger = logging.getLogger(__name__)

class RequestAborted(Exception):
    """The request was aborted while it was on this worker."""


@dataclass(frozen=True)
class PrefillResult:
    output_token_ids: list[int]  # the first token
    num_cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    prefill_s: float  # arrival on this worker -> first token
    handoff_s: float  # first token -> the decode worker has the KV (the part not hidden)
    transport: str  # which transport carried the KV
    layerwise: bool  # whether the KV streamed layer by layer during the prefill
    num_recomputed_tokens: int = 0  # blended chunk tokens recomputed (CacheBlend)
    output_logprobs: list[TokenLogprobs] | None = None  # of the first token, when asked
    handoff_bytes: int = 0  # the uncompressed size of the KV blocks handed over


class PrefillWorker(EngineWorker):
    role = "prefill"

    def __init__(self, config: WorkerConfig, model_id: str, index: int = 0,
                 loaded: LoadedModel | None = None) -> None:
        super().__init__(config, model_id, loaded)
        self.index = index
        self.transports: dict[str, KVTransport] = {}
        self._streamers: dict[str, LayerStreamer] = {}  # read on the engine thread
        self._sessions: dict[str, SendSession] = {}
        self._computed_at: dict[str, float] = {}  # request -> when its first token was sampled
        self._cleanups: set[asyncio.Task] = set()
        self.coding: Codec | AdaptiveCoding | None = None  # how gRPC handoffs code the KV
        self.reuse: KVReuse | None = None  # the prefixes and chunks taken from the store

    async def start(self) -> WorkerInfo:
        names = available_transports(self.config.kv_transport, self.config.tls is not None)
        await super().start()
        e = self._engine.engine
        self.coding = wire_coding(self.config, e.fingerprint, e.kv_spec)  # ValueError: no profile
        self.transports = {name: make_transport(name, self.coding, self.config.tls,
                                                self.config.host) for name in names}
        self.introductions = Introductions(self.transports, self.config.handoff_timeout_s)
        self.kv_transports = names
        self.store = await asyncio.to_thread(open_store, self.config.kv_store, e.fingerprint,
                                             e.kv_spec, f"prefill-{self.index}")
        self.reuse = KVReuse(self.store, self._engine, self.config.kv_store.lookup_timeout_s)
        return self.info()

    def chunk_reuse_stats(self) -> ChunkReuseSnapshot | None:
        return self.reuse.chunk_reuse() if self.reuse is not None else None

    def engine_config(self) -> EngineConfig:
        # With a store, reuse comes from it (whole chunks, shared across workers), so the
        # engine's own block-level prefix cache would only blur what `cached_tokens` means.
        # A prefill worker never decodes, so it captures no CUDA graphs.
        update: dict[str, bool] = {"cuda_graphs": False}
        if self.config.kv_store.enabled:
            update["enable_prefix_caching"] = False
        return self.config.engine.model_copy(update=update)

    def streams_layerwise(self, num_tokens: int) -> bool:
        mode = self.config.kv_streaming
        return mode == "layerwise" or (
            mode == "auto" and num_tokens >= self.config.layerwise_min_tokens)

    async def prefill(self, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams, receiver: ReceiverInfo,
                      block_ids: list[int], segments: SegmentedPrompt | None = None) \
            -> PrefillResult:
        """Prefill and move the KV into `block_ids` of the decode worker at `receiver`;
        a segmented prompt's chunks are blended from their cached KV when it asks for it."""
        target = KVTarget(receiver, tuple(block_ids), len(prompt_token_ids))
        return await self._prefill(request_id, prompt_token_ids, params,
                                   [RangeTarget(target, 0)], segments)

    async def prefill_to_ranges(self, request_id: str, prompt_token_ids: list[int],
                                params: SamplingParams, ranges: list[RangeTarget]) \
            -> PrefillResult:
        """Prefill and stream each token range's KV to its own receiver (attention workers
        holding an offloaded sequence by range)."""
        check_ranges(ranges, len(prompt_token_ids), self._engine.engine.kv_spec.block_size)
        return await self._prefill(request_id, prompt_token_ids, params, ranges, None)

    def _open_session(self, request_id: str, ranges: list[RangeTarget]) -> SendSession:
        e = self._engine.engine
        sessions = [self.transports[r.target.receiver.transport].open_session(
            e.cache, e.fingerprint, r.target, request_id) for r in ranges]
        if len(sessions) == 1:
            return sessions[0]
        bs = e.kv_spec.block_size
        return RangedSession([(r.first_token // bs, len(r.target.block_ids), s)
                              for r, s in zip(ranges, sessions, strict=True)])

    async def _prefill(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, ranges: list[RangeTarget],
                       segments: SegmentedPrompt | None) -> PrefillResult:
        started = time.perf_counter()
        engine, n = self._engine, len(prompt_token_ids)
        for r in ranges:
            if r.target.receiver.transport not in self.transports:
                have = ", ".join(self.transports)
                raise TransportNotUsable(f"this prefill worker cannot send KV over "
                                         f"{r.target.receiver.transport} (it has {have})")
        transport = ranges[0].target.receiver.transport
        stream = engine.open_stream(request_id)  # before the lookup: an abort closes it
        session: SendSession | None = None
        layerwise, handed_off, publish = self.streams_layerwise(n), False, False
        streamer: LayerStreamer | None = None
        reuse = self.reuse
        assert reuse is not None, "start() first"
        try:
            blending = reuse.can_blend(segments)
            exact = len(segments.prefix) if blending else n  # what may be published
            lookup = segments.prefix + segments.chunks[0][:1] if blending else prompt_token_ids
            cached = await reuse.load_prefix(request_id, lookup, params.cache_salt)
            loaded = cached.num_tokens if cached is not None else 0
            blended = await reuse.blend(request_id, segments, cached, params.cache_salt) \
                if blending else None
            for r in ranges:  # once per receiving worker
                await self.introductions.ensure(r.target.receiver)
            computing = time.perf_counter()
            if not engine.has_stream(request_id):
                raise RequestAborted(f"request {request_id} was aborted during its KV lookup")
            session = self._sessions[request_id] = self._open_session(request_id, ranges)
            streamer = self._streamers[request_id] = LayerStreamer(engine.engine, request_id, n,
                                                                   session)
            await engine.call(lambda e: _add(e, request_id, prompt_token_ids, params,
                                             None if blended else cached, blended,
                                             streamer if layerwise else None))
            try:
                item = await asyncio.wait_for(stream.get(), self.config.prefill_timeout_s)
            except TimeoutError:
                raise TimeoutError(f"request {request_id}: the prefill did not finish in "
                                   f"{self.config.prefill_timeout_s:.0f} s") from None
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason == "abort":
                raise RequestAborted(f"request {request_id} was aborted during prefill")
            prefilled = self._computed_at.pop(request_id, time.perf_counter())
            if streamer.restarted:  # preempted midway: the KV goes again, in one piece
                session = await self._restream(request_id, session, streamer, ranges, n)
            await session.finish(Handoff(request_id, item.token_ids,
                                         reuse.exact_tokens(cached, blended)),
                                 timeout=self.config.handoff_timeout_s)
            handed_off = True
            publish = self.store is not None
            if blended is None:
                reuse.measure_prefill(n - item.num_cached_tokens, prefilled - computing)
            self.handoffs[f"{transport}/{'layerwise' if layerwise else 'onepiece'}"] += 1
            handoff_s = time.perf_counter() - prefilled
            handoff_bytes = sum(len(r.target.block_ids) for r in ranges) \
                * engine.engine.kv_spec.bytes_per_block
            self.handoff_bytes += handoff_bytes
            self.handoff_s += handoff_s
            return PrefillResult(item.token_ids, item.num_cached_tokens, prefilled - started,
                                 handoff_s, transport, layerwise,
                                 item.num_recomputed_tokens, item.logprobs, handoff_bytes)
        finally:
            self._streamers.pop(request_id, None)
            self._computed_at.pop(request_id, None)
            engine.close_stream(request_id)
            if session is not None and not handed_off:  # the error goes out now; the blocks
                task = asyncio.get_running_loop().create_task(  # once no WRITE reads them
                    self._give_up(request_id, session, streamer))
                self._cleanups.add(task)
                task.add_done_callback(self._cleanups.discard)
            elif publish:  # the result goes out now; the blocks once the new chunks are copied
                self._sessions.pop(request_id, None)
                task = asyncio.get_running_loop().create_task(reuse.publish_and_release(
                    request_id, prompt_token_ids[:exact], loaded, params.cache_salt))
                self._cleanups.add(task)
                task.add_done_callback(self._cleanups.discard)
            else:
                self._sessions.pop(request_id, None)
                await engine.call(lambda e: e.abort(request_id))  # frees the blocks

    async def kv_index_changes(self, since: int) -> IndexDelta | None:
        """Which prefix chunks this worker's local tiers gained or lost since version `since`."""
        return None if self.store is None else self.store.index.changes_since(since)

    async def _restream(self, request_id: str, session: SendSession, streamer: LayerStreamer,
                        ranges: list[RangeTarget], n: int) -> SendSession:
        """End the transfer a preemption cut short (its WRITEs read the pinned blocks; the
        receiver drops what it got), free those blocks, and send the recomputed KV anew."""
        logger.info("request %s was preempted while its KV streamed: sending it again",
                    request_id)
        await session.abort()  # waits (bounded) for WRITEs in flight
        await self._unpin(streamer)
        session = self._sessions[request_id] = self._open_session(request_id, ranges)
        spec = self._engine.engine.kv_spec
        await self._engine.call(lambda e: session.post(
            range(spec.num_layers), 0, e.block_table(request_id)[:spec.num_blocks_for(n)]))
        self.handoffs[f"{ranges[0].target.receiver.transport}/restreamed"] += 1
        return session

    async def _unpin(self, streamer: LayerStreamer | None) -> None:
        while streamer is not None and streamer.pinned:
            blocks = streamer.pinned.pop()
            await self._engine.call(lambda e, blocks=blocks: e.unpin_blocks(blocks))

    async def _give_up(self, request_id: str, session: SendSession,
                       streamer: LayerStreamer | None = None) -> None:
        try:
            await session.abort()  # waits (bounded) for WRITEs in flight
        finally:
            self._sessions.pop(request_id, None)
            await self._unpin(streamer)
            await self._engine.call(lambda e: e.abort(request_id))

    def on_output(self, engine: LLMEngine, output: RequestOutput) -> RequestOutput:
        streamer = self._streamers.get(output.request_id)
        if streamer is not None and output.finish_reason != "abort":
            # The handoff's exposed time starts here, when compute ends, not when the event
            # loop gets to it: by then it may have copied much of the KV already.
            self._computed_at[output.request_id] = time.perf_counter()
            streamer.post_rest()  # before the next step can touch anything
        return output

    async def abort(self, request_id: str) -> bool:
        session = self._sessions.get(request_id)
        if session is not None:
            await session.abort()  # no more reads of the blocks before they are freed
        return await super().abort(request_id)

    def num_open_requests(self) -> int:
        return len(self._sessions)

    def kv_transport_objects(self) -> list[KVTransport]:
        return list(self.transports.values())

    def codec_choices(self) -> dict[str, int]:
        if isinstance(self.coding, AdaptiveCoding):
            return {f"cachegen:{k}": n for k, n in self.coding.controller.choices.items()}
        return {}

    async def shutdown(self) -> None:
        for transport in self.transports.values():
            await transport.close()
        await super().shutdown()


def _add(engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams,
         cached: KVBlocks | None, blended: BlendResult | None,
         on_layer_kv: LayerStreamer | None) -> None:
    """Queue the prefill, starting from the cached prefix (or the blended KV) when there are
    blocks to load it."""
    try:
        engine.add_request(request_id, prompt, params, prefill_only=True,
                           on_layer_kv=on_layer_kv, prefix_kv=cached, blended=blended,
                           on_preempt=on_layer_kv.preempted if on_layer_kv else None)
    except OutOfBlocksError:  # the queue will free blocks: compute it all instead
        if cached is None and blended is None:
            raise
        logger.info("request %s: no free blocks to load its cached prefix now; computing it",
                    request_id)
        engine.add_request(request_id, prompt, params, prefill_only=True,
                           on_layer_kv=on_layer_kv,
                           on_preempt=on_layer_kv.preempted if on_layer_kv else None)
