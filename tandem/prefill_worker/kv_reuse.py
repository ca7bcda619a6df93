"""`KVReuse`: what a prefill worker takes from its KV store and gives back to it.

Before a prefill: the longest cached prefix (off the engine thread), and for a segmented prompt
its chunks blended after that prefix (on the engine thread: it is compute). After the handoff:
the prompt's new whole prefix chunks, copied out of the request's blocks and written in the
background. The store never fails a request: whatever goes wrong there, the prompt is computed.
"""

from __future__ import annotations

import asyncio
import logging

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.blend import BlendCancelled, BlendResult
from tandem.engine.blend_planner import BlendPlanner
from tandem.engine.chunk_reuse_stats import TOP_CHUNKS, ChunkReuseSnapshot
from tandem.engine.engine import LLMEngine
from tandem.engine.kv_cache import KVBlocks
from tandem.engine.segments import SegmentedPrompt
from tandem.kv_store.chunk_cache import StoreChunkCache
from tandem.kv_store.store import TieredStore

logger = logging.getLogger(__name__)

MIN_MEASURED_TOKENS = 64  # shorter prefills say more about overheads than about the rate


class KVReuse:
    def __init__(self, store: TieredStore | None, engine: AsyncEngine,
                 lookup_timeout_s: float) -> None:
        self.store, self.engine, self.lookup_timeout_s = store, engine, lookup_timeout_s
        self.prefill_s_per_token: float | None = None  # measured: the store's controller
        self.planner = None if store is None else BlendPlanner(
            engine.engine.loaded.model, engine.engine.kv_spec, StoreChunkCache(store))

    def chunk_reuse(self) -> ChunkReuseSnapshot | None:
        """Chunk-cache reuse so far: totals and the most reused chunks (by hash)."""
        return self.planner.stats.snapshot(TOP_CHUNKS) if self.planner is not None else None

    def can_blend(self, segments: SegmentedPrompt | None) -> bool:
        """Whether `segments` asks for blending and there are chunk caches to blend from."""
        return segments is not None and segments.blend and bool(segments.chunks) \
            and self.planner is not None

    def exact_tokens(self, cached: KVBlocks | None, blended: BlendResult | None) -> int | None:
        """How many leading prompt tokens have exact KV after loading `cached` and blending
        (None: all): blended chunks are approximate, and so is KV a lossy codec stored."""
        if cached is not None and not cached.exact:
            return 0
        if blended is None or blended.exact_tokens >= blended.kv.num_tokens:
            return None  # all exact (a cold prompt's full prefill): the rest is computed on it
        return blended.exact_tokens

    def measure_prefill(self, computed_tokens: int, seconds: float) -> None:
        """Keep a running prefill time per token (it includes queueing: what a chunk that is
        not loaded really costs)."""
        if computed_tokens < MIN_MEASURED_TOKENS:
            return
        rate = seconds / computed_tokens
        last = self.prefill_s_per_token
        self.prefill_s_per_token = rate if last is None else last + 0.3 * (rate - last)

    async def load_prefix(self, request_id: str, prompt: list[int], salt: str | None) \
            -> KVBlocks | None:
        """The KV of the longest cached prefix (under the request's cache salt); None on a
        miss."""
        if self.store is None:
            return None
        try:
            return await asyncio.to_thread(self.store.load_prefix, prompt, self.lookup_timeout_s,
                                           self.prefill_s_per_token, salt)
        except Exception:
            logger.exception("request %s: KV store lookup failed; computing the prompt",
                             request_id)
            return None

    async def blend(self, request_id: str, segments: SegmentedPrompt,
                    prefix_kv: KVBlocks | None, salt: str | None) -> BlendResult | None:
        """The prompt's chunks blended after its prefix; None if that failed."""
        planner = self.planner
        assert planner is not None
        engine = self.engine

        def aborted() -> bool:  # the stream closes when the request is aborted
            return not engine.has_stream(request_id)

        try:
            return await engine.call(lambda e: planner.plan(segments, prefix_kv, salt, aborted))
        except BlendCancelled:
            return None  # the caller sees the abort next
        except Exception:
            logger.exception("request %s: blending its chunks failed; computing the prompt",
                             request_id)
            return None

    async def publish_and_release(self, request_id: str, prompt: list[int],
                                  num_cached: int, salt: str | None) -> None:
        """Publish `prompt`'s new chunks (its exact part, under its cache salt), then free the
        request's blocks."""
        try:
            await self._publish(request_id, prompt, num_cached, salt)
        finally:
            await self.engine.call(lambda e: e.abort(request_id))

    async def _publish(self, request_id: str, prompt: list[int], num_cached: int,
                       salt: str | None) -> None:
        """Queue the whole chunks of `prompt` that did not come from the store for writing."""
        store = self.store
        assert store is not None
        chunk_tokens = store.chunk_tokens
        first = num_cached // chunk_tokens
        # Earliest first: a chunk is reusable only after all before it. Chunks that would not
        # fit in the write queue are not even copied.
        keys = store.prefix_keys(prompt, salt)[first:][:store.free_write_slots()]
        if not keys:
            return
        try:
            chunks = await self.engine.call(lambda e: _copy_chunks(
                e, request_id, first, len(keys), chunk_tokens))
        except Exception:  # the request itself is done: only its reuse is lost
            logger.exception("request %s: copying its KV for the store failed", request_id)
            return
        for i, (key, kv) in enumerate(zip(keys, chunks, strict=True)):
            store.put(key, kv, first_position=(first + i) * chunk_tokens)


def _copy_chunks(engine: LLMEngine, request_id: str, first: int, count: int,
                 chunk_tokens: int) -> list[KVBlocks]:
    """Copies of chunks [first, first + count) of a prefilled request's KV (engine thread)."""
    spec, table = engine.kv_spec, engine.block_table(request_id)
    per = chunk_tokens // spec.block_size
    layers = range(spec.num_layers)
    return [KVBlocks(spec, chunk_tokens,
                     engine.cache.gather(layers, table[i * per:(i + 1) * per]).cpu())
            for i in range(first, first + count)]
