"""Where blending finds chunks' own KV: the `ChunkCache` interface and an in-process one.

A chunk's KV is computed on its own from position 0, so it is found by its tokens alone,
wherever the chunk appears. Workers use the tiered KV store through this interface
(`kv_store.chunk_cache.StoreChunkCache`); `LLM` uses `MemoryChunkCache` by default.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import torch


class ChunkCache(Protocol):
    def contains(self, token_ids: list[int]) -> bool:
        """Whether the chunk's KV is cached (a later `layer` can still miss: it may be evicted)."""
        ...

    def layer(self, token_ids: list[int], layer: int) -> torch.Tensor | None:
        """One layer of the chunk's KV [2, tokens, kv_heads, head_dim], or None if missing."""
        ...

    def put(self, token_ids: list[int], kv: torch.Tensor) -> None:
        """Cache the chunk's KV [layers, 2, tokens, kv_heads, head_dim] (maybe later)."""
        ...

    def salted(self, salt: str | None) -> ChunkCache:
        """The same cache as requests with `cache_salt=salt` see it: their chunks apart."""
        ...


@dataclass
class _Chunks:
    entries: OrderedDict[tuple[str | None, tuple[int, ...]], torch.Tensor] = field(
        default_factory=OrderedDict)
    used_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # `layer` runs on the
    # blend's prefetch thread


class MemoryChunkCache:
    """Chunks' KV in this process, least recently used evicted past `capacity_bytes`; salted
    views share the memory, not the chunks."""

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

    def contains(self, token_ids: list[int]) -> bool:
        with self._chunks.lock:
            return (self.salt, tuple(token_ids)) in self._chunks.entries

    def layer(self, token_ids: list[int], layer: int) -> torch.Tensor | None:
        key, chunks = (self.salt, tuple(token_ids)), self._chunks
        with chunks.lock:
            kv = chunks.entries.get(key)
            if kv is None:
                return None
            chunks.entries.move_to_end(key)
            return kv[layer]

    def put(self, token_ids: list[int], kv: torch.Tensor) -> None:
        key, size, chunks = (self.salt, tuple(token_ids)), kv.numel() * kv.element_size(), \
            self._chunks
        if size > self.capacity_bytes:
            return
        with chunks.lock:
            old = chunks.entries.pop(key, None)
            if old is not None:
                chunks.used_bytes -= old.numel() * old.element_size()
            while chunks.entries and chunks.used_bytes + size > self.capacity_bytes:
                _, evicted = chunks.entries.popitem(last=False)
                chunks.used_bytes -= evicted.numel() * evicted.element_size()
            chunks.entries[key] = kv.detach().clone()
            chunks.used_bytes += size
