"""Where blending finds chunks' own KV: the `ChunkCache` interface and an in-process one.

A chunk's KV is computed on its own from position 0, so it is found by its tokens alone,
wherever the chunk appears. Workers use the tiered KV store through this interface
(`kv_store.chunk_cache.StoreChunkCache`); `LLM` uses `MemoryChunkCache` by default.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
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


class MemoryChunkCache:
    """Chunks' KV in this process, least recently used evicted past `capacity_bytes`."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._chunks: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # `layer` runs on the blend's prefetch thread

    def contains(self, token_ids: list[int]) -> bool:
        with self._lock:
            return tuple(token_ids) in self._chunks

    def layer(self, token_ids: list[int], layer: int) -> torch.Tensor | None:
        key = tuple(token_ids)
        with self._lock:
            kv = self._chunks.get(key)
            if kv is None:
                return None
            self._chunks.move_to_end(key)
            return kv[layer]

    def put(self, token_ids: list[int], kv: torch.Tensor) -> None:
        key, size = tuple(token_ids), kv.numel() * kv.element_size()
        if size > self.capacity_bytes:
            return
        with self._lock:
            old = self._chunks.pop(key, None)
            if old is not None:
                self.used_bytes -= old.numel() * old.element_size()
            while self._chunks and self.used_bytes + size > self.capacity_bytes:
                _, evicted = self._chunks.popitem(last=False)
                self.used_bytes -= evicted.numel() * evicted.element_size()
            self._chunks[key] = kv.detach().clone()
            self.used_bytes += size
