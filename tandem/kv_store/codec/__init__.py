"""KV codecs: how one layer of a KV chunk becomes bytes and back, chosen by name.

A stored object holds each layer's encoding separately, so a reader can decode one layer (or a
group) without the rest. `raw` is the engine's own bytes; lossy codecs plug in here by name
without the tiers or the store knowing which one they hold.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from tandem.engine.kv_cache import KVSpec
from tandem.kv_store.errors import KVFormatError


class Codec(ABC):
    """Encodes one layer's KV, shape [2, num_blocks, block_size, kv_heads, head_dim]."""

    name: str

    @abstractmethod
    def encode_layer(self, layer: int, kv: torch.Tensor) -> bytes: ...

    @abstractmethod
    def decode_layer(self, layer: int, data: memoryview, spec: KVSpec, num_tokens: int) \
            -> torch.Tensor:
        """The layer's KV in `spec.dtype`; raises KVFormatError if `data` cannot be it."""


def get_codec(name: str) -> Codec:
    from tandem.kv_store.codec.raw import RawCodec

    codecs: dict[str, type[Codec]] = {"raw": RawCodec}
    if name not in codecs:
        raise KVFormatError(f"KV codec {name!r} is not supported (known: {', '.join(codecs)})")
    return codecs[name]()
