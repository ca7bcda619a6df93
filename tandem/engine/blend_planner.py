"""`BlendPlanner`: a segmented prompt's chunks found in a `ChunkCache` (or computed and cached),
then blended after the prefix.

The default policy (`blend_select.DEFAULT_POLICY`, Cache-Craft):
- each chunk's KV is the cached variant whose preceding chunks match the prompt's most
  (`chunk_variants.choose`), else the chunk's own KV (computed from position 0 on a miss);
- a prompt none of whose chunks is cached is prefilled in full (exact KV), and its chunks' KV
  kept as variants (`capture`): cold prompts pay full prefill once and leave context behind;
- per-chunk recompute budgets come from each chunk's dependence on what precedes it (measured
  at layer 1, where the blend is still exact, less the matched context), capped in total by the
  prompt's recompute_ratio.
`options=blend_select.CACHEBLEND` is CacheBlend as published (one HKVD selection of ratio x
the chunk tokens, no cold prefill).

The planner runs where the model runs (the engine's thread); the cache's reads happen one layer
ahead on the blend's prefetch thread. A chunk that goes missing between the lookup and its read
(evicted, or its tier failed) is computed on the spot and the blend starts again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch

from tandem.engine.blend import (
    BlendCancelled,
    BlendResult,
    ChunkKVUnavailable,
    blend,
    compute_kv,
    no_chunks,
)
from tandem.engine.blend_select import DEFAULT_POLICY, BlendOptions
from tandem.engine.chunk_cache import ChunkCache
from tandem.engine.chunk_reuse_stats import ChunkReuseStats
from tandem.engine.chunk_variants import Context, Variant, capture, choose, context_of, overlap
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
        self.stats = ChunkReuseStats()

    def plan(self, prompt: SegmentedPrompt, prefix_kv: KVBlocks | None = None,
             salt: str | None = None, cancelled: Callable[[], bool] | None = None,
             options: BlendOptions = DEFAULT_POLICY) -> BlendResult:
        """The blended KV of `prompt.prefix + chunks` (the question is left to the engine's
        ordinary prefill); `prefix_kv` holds exact KV for the prefix's first tokens (the rest of
        the prefix is computed). Each chunk's KV is the cached variant whose context matches
        the prompt most, else its own (computed and cached on a miss), under the request's
        `salt`. `cancelled` is asked before each chunk and each layer: True stops with
        BlendCancelled."""
        cache = self.cache.salted(salt)
        cached_prefix = prefix_kv.num_tokens if prefix_kv is not None else 0
        if cached_prefix > len(prompt.prefix):
            raise ValueError(f"prefix_kv covers {cached_prefix} tokens, the prefix segment has "
                             f"{len(prompt.prefix)}")
        chunks = prompt.chunks
        # Question-aware selection computes the question in the blend (all but its last
        # token: the engine computes at least one).
        tail = prompt.question[:-1] if options.question_aware else []
        computed: dict[int, torch.Tensor] = {}
        contexts: list[Context] = []
        missing = []
        for j, chunk in enumerate(chunks):
            if cancelled is not None and cancelled():
                raise BlendCancelled(f"aborted while looking up chunk {j}")
            contexts.append(self._variant(cache, chunks, j))
            if not contexts[-1] and not cache.contains(chunk):
                missing.append(j)
        if options.capture_cold and len(missing) == len(chunks) > 1:
            return self._prefill_cold(prompt, prefix_kv, salt, cancelled)
        for j in missing:
            computed[j] = self._compute(cache, chunks[j])
        matched = tuple(overlap(c, context_of(chunks, j)) for j, c in enumerate(contexts))
        if options.matched is None:
            options = replace(options, matched=matched)
        while True:
            hits = sum(len(c) for j, c in enumerate(chunks) if j not in computed)
            try:
                result = blend(self.model, self.spec, prefix_kv, prompt.prefix[cached_prefix:],
                               chunks, self._source(cache, chunks, contexts, computed),
                               prompt.recompute_ratio, tail_ids=tail, options=options,
                               cached_tokens=cached_prefix + hits, cancelled=cancelled)
            except ChunkMissing as e:  # each retry computes one more chunk: it ends
                logger.info("chunk KV went missing while blending (%s); computing it", e)
                contexts[e.chunk] = ()
                computed[e.chunk] = self._compute(cache, chunks[e.chunk])
                continue
            result.matched = matched
            self.stats.record(chunks, contexts, computed, result)
            return result

    def _prefill_cold(self, prompt: SegmentedPrompt, prefix_kv: KVBlocks | None,
                      salt: str | None, cancelled: Callable[[], bool] | None) -> BlendResult:
        """None of the chunks is cached: compute prefix and chunks exactly (a full prefill),
        and keep the chunks' KV as variants for the prompts that reuse them."""
        cached_prefix = prefix_kv.num_tokens if prefix_kv is not None else 0
        rest = prompt.prefix[cached_prefix:] + [t for c in prompt.chunks for t in c]
        result = blend(self.model, self.spec, prefix_kv, rest, [], no_chunks, 1.0,
                       cached_tokens=cached_prefix, cancelled=cancelled)
        self.capture(prompt, result.kv, salt)
        self.stats.counted(cold=1)
        result.recomputed_tokens = prompt.num_chunk_tokens  # every chunk token was computed
        return result

    def capture(self, prompt: SegmentedPrompt, kv: KVBlocks, salt: str | None = None) -> int:
        """Keep the chunk variants a full prefill of `prompt` computed (`kv`: its exact KV,
        covering at least the prefix and chunks); returns how many were cached."""
        if not kv.exact:
            raise ValueError("capture: the KV is approximate; variants come from exact KV only")
        n = len(prompt.prefix) + prompt.num_chunk_tokens
        if kv.num_tokens < n:
            raise ValueError(f"capture: the KV covers {kv.num_tokens} tokens, the prefix and "
                             f"chunks {n}")
        s, cache = self.spec, self.cache.salted(salt)
        flat = kv.data.reshape(s.num_layers, 2, -1, s.num_kv_heads, s.head_dim)[:, :, :n]
        captured = capture(self.model, s, prompt.token_ids[:n], flat, len(prompt.prefix),
                           prompt.chunks)
        for variant in captured:
            cache.put(variant.token_ids, variant.kv, variant.context, variant.dependence)
        self.stats.counted(captured=len(captured))
        return len(captured)

    def _variant(self, cache: ChunkCache, chunks: list[list[int]], j: int) -> Context:
        """The context of the variant of chunk `j` to use (() = its own KV)."""
        wanted = context_of(chunks, j)
        if not wanted:
            return ()
        variants = cache.variants(chunks[j])
        if all(v.context != wanted for v in variants) and cache.contains(chunks[j], wanted):
            variants.append(Variant(wanted, None))  # a shared tier's, not in our manifest
        chosen = choose(variants, wanted)
        return chosen.context if chosen is not None else ()

    def _compute(self, cache: ChunkCache, chunk: list[int]) -> torch.Tensor:
        kv = compute_kv(self.model, self.spec, chunk)
        cache.put(chunk, kv)
        return kv

    def _source(self, cache: ChunkCache, chunks: list[list[int]], contexts: list[Context],
                computed: dict[int, torch.Tensor]):
        """layer -> every chunk's KV of that layer, from the cache or from `computed`."""
        s = self.spec

        def layer(index: int) -> torch.Tensor:
            parts = []
            for j, chunk in enumerate(chunks):
                kv = computed[j][index] if j in computed else \
                    cache.layer(chunk, index, contexts[j])
                if kv is None:
                    raise ChunkMissing(j, f"layer {index} is no longer cached")
                if tuple(kv.shape) != (2, len(chunk), s.num_kv_heads, s.head_dim):
                    raise ChunkMissing(j, f"layer {index} has shape {tuple(kv.shape)}")
                parts.append(kv.to(s.torch_dtype))
            return torch.cat(parts, dim=1)

        return layer
