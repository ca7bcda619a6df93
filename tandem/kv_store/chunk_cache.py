"""`StoreChunkCache`: the tiered store as blending's chunk cache.

A chunk's KV, computed on its own from position 0, lives under its position-independent key
(`keys.chunk_key`) like any other object, so every tier, codec and worker shares it; blending
reads it one layer at a time (ranged reads of that layer's section). A variant (the chunk's
KV computed behind other chunks, `engine.chunk_variants`) lives under that key plus its
context's chunk hashes, its dependence in the object's header.

The manifest of a chunk's variants is kept in this process (at most MAX_VARIANTS per chunk,
the oldest dropped first); a variant another worker wrote to a shared tier is found by asking
for the exact context a prompt has (`contains`), not through the manifest.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from tandem.engine.chunk_variants import MAX_VARIANTS, Context, Variant
from tandem.engine.kv_cache import KVBlocks
from tandem.kv_store import keys
from tandem.kv_store.store import TieredStore

MAX_MANIFESTS = 1 << 14  # chunks with variants listed; past this the oldest are forgotten


class Manifests:
    """Chunk key -> its variants (context -> dependence), oldest first."""

    def __init__(self) -> None:
        self._lists: OrderedDict[str, OrderedDict[Context, float | None]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, chunk_key: str, context: Context, dependence: float | None) -> None:
        with self._lock:
            variants = self._lists.setdefault(chunk_key, OrderedDict())
            self._lists.move_to_end(chunk_key)
            variants.pop(context, None)
            variants[context] = dependence
            while len(variants) > MAX_VARIANTS:  # the oldest contextual variant goes
                del variants[next(c for c in variants if c)]
            while len(self._lists) > MAX_MANIFESTS:
                self._lists.popitem(last=False)

    def get(self, chunk_key: str) -> list[Variant]:
        with self._lock:
            return [Variant(c, d) for c, d in self._lists.get(chunk_key, {}).items()]


class StoreChunkCache:
    def __init__(self, store: TieredStore, salt: str | None = None,
                 manifests: Manifests | None = None) -> None:
        self.store, self.salt = store, salt
        self.namespace = keys.salted(store.namespace, salt)
        self.manifests = manifests or Manifests()

    def salted(self, salt: str | None) -> StoreChunkCache:
        return self if salt == self.salt else StoreChunkCache(self.store, salt, self.manifests)

    def key(self, token_ids: list[int], context: Context = ()) -> str:
        base = keys.chunk_key(self.namespace, token_ids)
        return f"{base}:v:{'.'.join(context)}" if context else base

    def contains(self, token_ids: list[int], context: Context = ()) -> bool:
        return self.store.contains(self.key(token_ids, context))

    def variants(self, token_ids: list[int]) -> list[Variant]:
        listed = self.manifests.get(self.key(token_ids))
        if not any(not v.context for v in listed) and self.contains(token_ids):
            listed.append(Variant((), None))
        return listed

    def layer(self, token_ids: list[int], layer: int, context: Context = ()) \
            -> torch.Tensor | None:
        data = self.store.get_layers(self.key(token_ids, context), range(layer, layer + 1),
                                     num_tokens=len(token_ids))
        if data is None:
            return None
        s = self.store.spec
        return data[0].reshape(2, -1, s.num_kv_heads, s.head_dim)[:, :len(token_ids)]

    def put(self, token_ids: list[int], kv: torch.Tensor, context: Context = (),
            dependence: float | None = None) -> None:
        """Queue the chunk's KV [layers, 2, tokens, heads, dim] for writing (dropped, and
        counted, when the write queue is full)."""
        s, n = self.store.spec, len(token_ids)
        data = torch.zeros((s.num_layers, 2, s.num_blocks_for(n) * s.block_size,
                            s.num_kv_heads, s.head_dim), dtype=s.torch_dtype)
        data[:, :, :n] = kv
        blocks = data.view(s.num_layers, 2, -1, s.block_size, s.num_kv_heads, s.head_dim)
        if self.store.put(self.key(token_ids, context), KVBlocks(s, n, blocks),
                          first_position=0, dependence=dependence):
            self.manifests.add(self.key(token_ids), context, dependence)
