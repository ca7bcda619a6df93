"""`StoreChunkCache`: the tiered store as blending's chunk cache.

A chunk's KV, computed on its own from position 0, lives under its position-independent key
(`keys.chunk_key`) like any other object, so every tier, codec and worker shares it; blending
reads it one layer at a time (ranged reads of that layer's section).
"""

from __future__ import annotations

import torch

from tandem.engine.kv_cache import KVBlocks
from tandem.kv_store import keys
from tandem.kv_store.store import TieredStore


class StoreChunkCache:
    def __init__(self, store: TieredStore, salt: str | None = None) -> None:
        self.store, self.salt = store, salt
        self.namespace = keys.salted(store.namespace, salt)

    def salted(self, salt: str | None) -> StoreChunkCache:
        return self if salt == self.salt else StoreChunkCache(self.store, salt)

    def key(self, token_ids: list[int]) -> str:
        return keys.chunk_key(self.namespace, token_ids)

    def contains(self, token_ids: list[int]) -> bool:
        return self.store.contains(self.key(token_ids))

    def layer(self, token_ids: list[int], layer: int) -> torch.Tensor | None:
        data = self.store.get_layers(self.key(token_ids), range(layer, layer + 1),
                                     num_tokens=len(token_ids))
        if data is None:
            return None
        s = self.store.spec
        return data[0].reshape(2, -1, s.num_kv_heads, s.head_dim)[:, :len(token_ids)]

    def put(self, token_ids: list[int], kv: torch.Tensor) -> None:
        """Queue the chunk's KV [layers, 2, tokens, heads, dim] for writing (dropped, and
        counted, when the write queue is full)."""
        s, n = self.store.spec, len(token_ids)
        data = torch.zeros((s.num_layers, 2, s.num_blocks_for(n) * s.block_size,
                            s.num_kv_heads, s.head_dim), dtype=s.torch_dtype)
        data[:, :, :n] = kv
        blocks = data.view(s.num_layers, 2, -1, s.block_size, s.num_kv_heads, s.head_dim)
        self.store.put(self.key(token_ids), KVBlocks(s, n, blocks), first_position=0)
