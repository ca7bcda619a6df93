"""A piece of KV coded by a KV codec for the wire: per layer, a u32 length and the layer's
section, as the store's codecs (raw, CacheGen) encode it. Only the gRPC transport codes
pieces: NIXL writes the blocks in place."""

from __future__ import annotations

import struct

import torch

from tandem.engine.kv_cache import KVSpec
from tandem.kv_store.codec import Codec
from tandem.kv_store.codec.controller import BandwidthMeter, StreamingController
from tandem.kv_store.errors import KVFormatError

_LENGTH = struct.Struct("<I")
INITIAL_BANDWIDTH_BPS = 1e9  # to a receiver no handoff has measured yet


def piece_tokens(spec: KVSpec, total_tokens: int, first_block: int, num_blocks: int) -> int:
    """Tokens of a request's KV that lie in blocks [first_block, first_block + num_blocks)."""
    return max(0, min(num_blocks * spec.block_size, total_tokens - first_block * spec.block_size))


def encode_piece(codec: Codec, data: torch.Tensor, layers: range, num_tokens: int,
                 first_position: int) -> bytes:
    """`data` ([len(layers), 2, blocks, ...] as `KVCache.gather` returns it) coded layer by
    layer."""
    out = []
    for i, layer in enumerate(layers):
        section = codec.encode_layer(layer, data[i], num_tokens, first_position)
        out += [_LENGTH.pack(len(section)), section]
    return b"".join(out)


def decode_piece(codec: Codec, payload: bytes | bytearray | memoryview, spec: KVSpec,
                 layers: range, num_tokens: int) -> torch.Tensor:
    """The piece's KV, [len(layers), 2, blocks, block_size, heads, head_dim] in `spec.dtype`;
    KVFormatError if `payload` is not a coded piece of that shape."""
    view, offset, out = memoryview(payload), 0, []
    for layer in layers:
        if offset + _LENGTH.size > len(view):
            raise KVFormatError(f"coded KV piece is truncated before layer {layer}")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + length > len(view):
            raise KVFormatError(f"coded KV piece is truncated in layer {layer}")
        out.append(codec.decode_layer(layer, view[offset:offset + length], spec, num_tokens))
        offset += length
    if offset != len(view):
        raise KVFormatError(f"coded KV piece has {len(view) - offset} bytes left over")
    return torch.stack(out)


class AdaptiveCoding:
    """`--kv-codec cachegen:auto`: each piece at the finest CacheGen level that reaches the
    receiver within its share of `budget_s` (its tokens / the request's tokens) at the
    bandwidth measured to that receiver so far (CacheGen's controller, per peer)."""

    def __init__(self, codecs: dict[int, Codec], spec: KVSpec, budget_s: float) -> None:
        self.codecs, self.spec, self.budget_s = codecs, spec, budget_s
        self.controller = StreamingController()
        self._bandwidth: dict[str, BandwidthMeter] = {}

    def pick(self, address: str, num_tokens: int, total_tokens: int) -> Codec:
        sizes = {str(level): codec.bytes_per_token(self.spec)
                 for level, codec in sorted(self.codecs.items())}
        meter = self._meter(address)
        share = self.budget_s * num_tokens / max(total_tokens, 1)
        choice = self.controller.choose(sizes, num_tokens, meter.bps, share)
        return self.codecs[int(choice.option)]

    def observe(self, address: str, num_bytes: int, seconds: float) -> None:
        self._meter(address).observe(num_bytes, seconds)

    def _meter(self, address: str) -> BandwidthMeter:
        if address not in self._bandwidth:
            self._bandwidth[address] = BandwidthMeter(INITIAL_BANDWIDTH_BPS)
        return self._bandwidth[address]
