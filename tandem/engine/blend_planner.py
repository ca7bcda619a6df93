"""`BlendPlanner`: a segmented prompt's chunks found in a `ChunkCache` (or computed and cached),
then blended after the prefix.

The planner runs where the model runs (the engine's thread); the cache's reads happen one layer
ahead on the blend's prefetch thread. A chunk that goes missing between the lookup and its read
(evicted, or its tier failed) is computed on the spot and the blend starts again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from tandem.engine.blend import (
    BlendCancelled,
    BlendResult,
    ChunkKVUnavailable,
    blend,
    compute_kv,
)
from tandem.engine.chunk_cache import ChunkCache
from tandem.engine.kv_cache import KVBlocks, KVSpec
from tandem.engine.model import LlamaModel
from tandem.engine.segments import SegmentedPrompt

logger = logging.getLogger(__name__)


class ChunkMissing(ChunkKVUnavailable):
    def __init__(self, chunk: int, reason: str) -> None:
        super().__init__(f"chunk {chunk}: {reason}")
        self.chunk = chunk


class BlendPlanner:
    def __init__(self, model: LlamaModel, spec: KVSpec, cache: ChunkCache) -> None:
        self.model, self.spec, self.cache = model, spec, cache

    def plan(self, prompt: SegmentedPrompt, prefix_kv: KVBlocks | None = None,
             salt: str | None = None, cancelled: Callable[[], bool] | None = None) \
            -> BlendResult:
        """The blended KV of `prompt.prefix + chunks` (the question is left to the engine's
        ordinary prefill); `prefix_kv` holds exact KV for the prefix's first tokens (the rest of
        the prefix is computed). Chunks are cached under the request's `salt`. `cancelled` is
        asked before each chunk and each layer: True stops with BlendCancelled."""
        cache = self.cache.salted(salt)
        cached_prefix = prefix_kv.num_tokens if prefix_kv is not None else 0
        if cached_prefix > len(prompt.prefix):
            raise ValueError(f"prefix_kv covers {cached_prefix} tokens, the prefix segment has "
                             f"{len(prompt.prefix)}")
        chunks = prompt.chunks
        computed: dict[int, torch.Tensor] = {}
        for j, chunk in enumerate(chunks):
            if cancelled is not None and cancelled():
                raise BlendCancelled(f"aborted while looking up chunk {j}")
            if not cache.contains(chunk):
                computed[j] = self._compute(cache, chunk)
        while True:
            hits = sum(len(c) for j, c in enumerate(chunks) if j not in computed)
            try:
                return blend(self.model, self.spec, prefix_kv, prompt.prefix[cached_prefix:],
                             chunks, self._source(cache, chunks, computed),
                             prompt.recompute_ratio,
                             cached_tokens=cached_prefix + hits, cancelled=cancelled)
            except ChunkMissing as e:  # each retry computes one more chunk: it ends
                logger.info("chunk KV went missing while blending (%s); computing it", e)
                computed[e.chunk] = self._compute(cache, chunks[e.chunk])

    def _compute(self, cache: ChunkCache, chunk: list[int]) -> torch.Tensor:
        kv = compute_kv(self.model, self.spec, chunk)
        cache.put(chunk, kv)
        return kv

    def _source(self, cache: ChunkCache, chunks: list[list[int]],
                computed: dict[int, torch.Tensor]):
        """layer -> every chunk's KV of that layer, from the cache or from `computed`."""
        s = self.spec

        def layer(index: int) -> torch.Tensor:
            parts = []
            for j, chunk in enumerate(chunks):
                kv = computed[j][index] if j in computed else cache.layer(chunk, index)
                if kv is None:
                    raise ChunkMissing(j, f"layer {index} is no longer cached")
                if tuple(kv.shape) != (2, len(chunk), s.num_kv_heads, s.head_dim):
                    raise ChunkMissing(j, f"layer {index} has shape {tuple(kv.shape)}")
                parts.append(kv.to(s.torch_dtype))
            return torch.cat(parts, dim=1)

        return layer
