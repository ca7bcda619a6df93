"""Where blending finds chunks' own KV: the `ChunkCache` interface and an in-process one.

A chunk's KV is computed on its own from position 0, so it is found by its tokens alone,
wherever the chunk appears. Workers use the tiered KV store through this interface
(`kv_store.chunk_cache.StoreChunkCache`); `LLM` uses `MemoryChunkCache` by default.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tandem.engine.chunk_variants import MAX_VARIANTS, Context, Variant


class ChunkCache(Protocol):
    def contains(self, token_ids: list[int], context: Context = ()) -> bool:
        """Whether the chunk's KV (the variant for `context`; () = computed on its own) is
        cached (a later `layer` can still miss: it may be evicted)."""
        ...

    def layer(self, token_ids: list[int], layer: int, context: Context = ()) \
            -> torch.Tensor | None:
        """One layer of the chunk's KV [2, tokens, kv_heads, head_dim], or None if missing."""
        ...

    def put(self, token_ids: list[int], kv: torch.Tensor, context: Context = (),
            dependence: float | None = None) -> None:
        """Cache the chunk's KV [layers, 2, tokens, kv_heads, head_dim] (maybe later), keys
        as if at position 0; `context` and `dependence` make it a variant (chunk_variants)."""
        ...

    def variants(self, token_ids: list[int]) -> list[Variant]:
        """The chunk's variants this cache knows of (at most MAX_VARIANTS)."""
        ...

    def salted(self, salt: str | None) -> ChunkCache:
        """The same cache as requests with `cache_salt=salt` see it: their chunks apart."""
        ...


def chunk_value(hits: int, num_tokens: int, dependence: float | None, num_bytes: int) -> float:
    """What keeping a chunk's KV is worth per byte: reuse frequency x the compute it saves
    (its tokens, less the share its dependence says is recomputed) / its size."""
    return (1 + hits) * num_tokens * (1.0 - min(1.0, dependence or 0.0)) / max(1, num_bytes)


@dataclass
class _Entry:
    kv: torch.Tensor
    dependence: float | None
    hits: int = 0

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def value(self) -> float:
        return chunk_value(self.hits, self.kv.shape[2], self.dependence, self.num_bytes)


Key = tuple[str | None, tuple[int, ...], Context]


@dataclass
class _Chunks:
    entries: dict[Key, _Entry] = field(default_factory=dict)
    used_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # `layer` runs on the
    # blend's prefetch thread


class MemoryChunkCache:
    """Chunks' KV and variants in this process; past `capacity_bytes` the least valuable
    (`chunk_value`) go first. Salted views share the memory, not the chunks."""

    def __init__(self, capacity_bytes: int, salt: str | None = None,
                 chunks: _Chunks | None = None) -> None:
        self.capacity_bytes, self.salt = capacity_bytes, salt
        self._chunks = chunks or _Chunks()

    @property
    def used_bytes(self) -> int:
        return self._chunks.used_bytes

    def salted(self, salt: str | None) -> MemoryChunkCache:
        if salt == self.salt:
            return self
        return MemoryChunkCache(self.capacity_bytes, salt, self._chunks)

    def contains(self, token_ids: list[int], context: Context = ()) -> bool:
        with self._chunks.lock:
            return (self.salt, tuple(token_ids), context) in self._chunks.entries

    def layer(self, token_ids: list[int], layer: int, context: Context = ()) \
            -> torch.Tensor | None:
        with self._chunks.lock:
            entry = self._chunks.entries.get((self.salt, tuple(token_ids), context))
            if entry is None:
                return None
            if layer == 0:
                entry.hits += 1
            return entry.kv[layer]

    def variants(self, token_ids: list[int]) -> list[Variant]:
        tokens = tuple(token_ids)
        with self._chunks.lock:
            return [Variant(key[2], entry.dependence)
                    for key, entry in self._chunks.entries.items()
                    if key[0] == self.salt and key[1] == tokens]

    def put(self, token_ids: list[int], kv: torch.Tensor, context: Context = (),
            dependence: float | None = None) -> None:
        entry, chunks = _Entry(kv.detach().clone(), dependence), self._chunks
        key: Key = (self.salt, tuple(token_ids), context)
        if entry.num_bytes > self.capacity_bytes:
            return
        with chunks.lock:
            self._drop(chunks.entries.get(key) and key)
            siblings = [k for k in chunks.entries if k[:2] == key[:2]]
            if len(siblings) >= MAX_VARIANTS:  # the chunk's least valuable variant makes room
                self._drop(min(siblings, key=lambda k: (not k[2], chunks.entries[k].value)))
            while chunks.entries and chunks.used_bytes + entry.num_bytes > self.capacity_bytes:
                self._drop(min(chunks.entries, key=lambda k: chunks.entries[k].value))
            chunks.entries[key] = entry
            chunks.used_bytes += entry.num_bytes

    def eviction_order(self) -> list[Key]:
        """Cached keys, the first to be evicted first."""
        with self._chunks.lock:
            return sorted(self._chunks.entries, key=lambda k: self._chunks.entries[k].value)

    def _drop(self, key: Key | None) -> None:
        if key:
            self._chunks.used_bytes -= self._chunks.entries.pop(key).num_bytes
