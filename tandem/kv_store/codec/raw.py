"""The `raw` codec: a layer's KV bytes exactly as the engine holds them (lossless)."""

from __future__ import annotations

import torch

from tandem.engine.kv_cache import KVSpec
from tandem.kv_store.codec import Codec
from tandem.kv_store.errors import KVFormatError


class RawCodec(Codec):
    name = "raw"

    def encode_layer(self, layer: int, kv: torch.Tensor, num_tokens: int,
                     first_position: int = 0) -> bytes:
        return kv.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()

    def decode_layer(self, layer: int, data: memoryview, spec: KVSpec, num_tokens: int) \
            -> torch.Tensor:
        shape = (2, spec.num_blocks_for(num_tokens), spec.block_size, spec.num_kv_heads,
                 spec.head_dim)
        want = 2 * shape[1] * spec.bytes_per_region
        if len(data) != want:
            raise KVFormatError(f"raw layer {layer} is {len(data)} bytes, expected {want}")
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return flat.view(spec.torch_dtype).view(shape)
