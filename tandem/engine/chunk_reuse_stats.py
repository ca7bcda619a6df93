"""What chunk-cache reuse did: totals for the metrics, and the most reused chunks (by their
hash, never their text) for a worker's stats."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from tandem.engine.chunk_variants import Context, chunk_hash

MAX_TRACKED_CHUNKS = 4096  # past this, the least reused chunk's counts are dropped
TOP_CHUNKS = 10  # in a worker's stats


@dataclass
class ChunkUse:
    hits: int = 0  # blends that loaded the chunk's KV (its own or a variant)
    variant_hits: int = 0  # ... a variant computed in a real context
    saved_tokens: float = 0.0  # its tokens not recomputed in those blends


@dataclass
class ChunkReuseSnapshot:
    blends: int = 0
    chunks: int = 0  # chunks blended
    chunk_hits: int = 0  # ... whose KV came from the cache
    variant_hits: int = 0  # ... as a variant
    matched_context_chunks: int = 0  # preceding chunks the used variants matched, summed
    recomputed_tokens: int = 0
    saved_tokens: int = 0  # chunk tokens loaded and not recomputed
    captured: int = 0  # variants cached from full prefills
    cold: int = 0  # prompts none of whose chunks was cached: prefilled in full
    top: list[tuple[str, ChunkUse]] = field(default_factory=list)  # (chunk hash, its use)


class ChunkReuseStats:
    def __init__(self) -> None:
        self.totals = ChunkReuseSnapshot()
        self._per_chunk: dict[str, ChunkUse] = {}
        self._lock = threading.Lock()

    def counted(self, *, cold: int = 0, captured: int = 0) -> None:
        """Count prompts prefilled in full, and the variants kept from them."""
        with self._lock:
            self.totals.cold += cold
            self.totals.captured += captured

    def record(self, chunks: list[list[int]], contexts: list[Context],
               computed: dict[int, torch.Tensor], result) -> None:
        """One blend: `contexts` the variants used, `computed` the chunks computed instead."""
        chunk_tokens = sum(map(len, chunks)) or 1
        kept = 1.0 - result.recomputed_tokens / chunk_tokens
        matched = result.matched or (0,) * len(chunks)
        with self._lock:
            t = self.totals
            t.blends += 1
            t.chunks += len(chunks)
            t.recomputed_tokens += result.recomputed_tokens
            for j, chunk in enumerate(chunks):
                if j in computed:
                    continue
                use = self._use(chunk_hash(chunk))
                use.hits += 1
                use.saved_tokens += len(chunk) * kept
                t.chunk_hits += 1
                t.saved_tokens += round(len(chunk) * kept)
                if contexts[j]:
                    use.variant_hits += 1
                    t.variant_hits += 1
                    t.matched_context_chunks += matched[j]

    def snapshot(self, top_n: int = TOP_CHUNKS) -> ChunkReuseSnapshot:
        with self._lock:
            top = sorted(self._per_chunk.items(), key=lambda kv: -kv[1].saved_tokens)[:top_n]
            return ChunkReuseSnapshot(**{**vars(self.totals), "top": [
                (h, ChunkUse(**vars(u))) for h, u in top]})

    def _use(self, key: str) -> ChunkUse:
        use = self._per_chunk.get(key)
        if use is None:
            if len(self._per_chunk) >= MAX_TRACKED_CHUNKS:
                least = min(self._per_chunk, key=lambda k: self._per_chunk[k].saved_tokens)
                del self._per_chunk[least]
            use = self._per_chunk[key] = ChunkUse()
        return use
