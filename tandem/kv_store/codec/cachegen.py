"""The CacheGen codec: one layer of KV as a compact bitstream (SIGCOMM'24, measured on ours).

Per layer, keys and values separately:
1. The first `SINK_TOKENS` tokens of the sequence (attention sinks) are kept exact.
2. Every other value is quantized uniformly around its channel's mean with the layer's step
   (the profile's sensitivity-weighted step x the level's scale): q = round((x - mean) / step).
   Measured on SmolLM2-135M, this beat per-token max-abs scaling (the public code) and the
   paper's anchor/delta grouping at every rate (see bench/codec.py --compare).
3. The symbols are range-coded (constriction) channel by channel, each channel with its own
   distribution: the profile's Laplace fit, discretized at the step. |q| > MAX_SYMBOL (and
   NaN) escapes to the exact value. A nonzero symbol decodes to the centre of mass of its
   interval, so every value is within `max_error` (step / 2 + that shift) of the original.
Layers are independent streams: one decodes alone. Identical input gives identical bytes.

The entropy models are integer frequency tables computed from the profile; floating point
could round them differently on another machine or library version, so each part carries a
digest of its table (and the constriction version), and a decoder whose table differs refuses
the stream instead of decoding garbage.

Layer section: u32 sink tokens; for K then V: u32 table digest, u32 coded words, u32 escapes,
the words (u32), the escapes (u32 index + the exact value); then the sink tokens' exact K, V.
"""

from __future__ import annotations

import importlib.metadata
import re
import struct
from functools import cached_property

import constriction
import numpy as np
import torch
import xxhash

from tandem.engine.kv_cache import KVSpec
from tandem.kv_store.codec import Codec
from tandem.kv_store.codec.profile import SINK_TOKENS, CacheGenProfile
from tandem.kv_store.errors import KVFormatError

# Level -> step scale. Bits per value and worst-case error are measured by bench/codec.py;
# NOMINAL_BITS is what it measured on SmolLM2-135M (all side information included).
LEVELS: dict[int, float] = {0: 0.12, 1: 0.3, 2: 0.55, 3: 0.8, 4: 1.2}
NOMINAL_BITS: dict[int, float] = {0: 5.08, 1: 3.76, 2: 2.90, 3: 2.39, 4: 1.85}
MAX_SYMBOL = 63
ESCAPE = 2 * MAX_SYMBOL + 1
ALPHABET = ESCAPE + 1
PROB_BITS = 16
_COUNTS = struct.Struct("<III")  # table digest, coded words, escapes
NAME = re.compile(r"cachegen:([0-4]):([0-9a-f]{16})")


class CacheGenCodec(Codec):
    lossless = False
    def __init__(self, profile: CacheGenProfile, level: int) -> None:
        if level not in LEVELS:
            raise ValueError(f"CacheGen level {level} does not exist (levels: {list(LEVELS)})")
        self.profile, self.level = profile, level
        self.name = f"cachegen:{level}:{profile.id}"
        self.steps = profile.step * LEVELS[level]  # [layers, 2, channels]

    def check(self, fingerprint: str, spec: KVSpec) -> None:
        if fingerprint != self.profile.fingerprint:
            raise KVFormatError(f"CacheGen profile {self.profile.id} is for model "
                                f"{self.profile.fingerprint!r}, not {fingerprint!r}")
        self.profile.check(spec)

    @cached_property
    def _models(self) -> list[list[tuple[int, list]]]:
        """Per [layer][K|V]: the digest of its frequency table and its entropy models, one per
        channel: integer frequencies from the discretized Laplace fit."""
        q = np.arange(-MAX_SYMBOL, MAX_SYMBOL + 1, dtype=np.float64)
        version = importlib.metadata.version("constriction").encode()
        models = []
        for layer in range(self.profile.num_layers):
            parts = []
            for part in range(2):
                b = self.profile.scale[layer, part].astype(np.float64)[:, None]
                step = self.steps[layer, part].astype(np.float64)[:, None]
                cdf_hi = _laplace_cdf((q + 0.5) * step, b)
                cdf_lo = _laplace_cdf((q - 0.5) * step, b)
                tail = 1.0 - (cdf_hi[:, -1:] - cdf_lo[:, :1])
                probs = np.concatenate([cdf_hi - cdf_lo, tail], axis=1)
                freqs = np.maximum(1, np.floor(probs * (1 << PROB_BITS)))
                probs32 = (freqs / freqs.sum(axis=1, keepdims=True)).astype(np.float32)
                digest = xxhash.xxh32_intdigest(version + probs32.tobytes())
                parts.append((digest, [constriction.stream.model.Categorical(p, perfect=False)
                                       for p in probs32]))
            models.append(parts)
        return models

    @cached_property
    def _centroid_shift(self) -> list[list[torch.Tensor]]:
        """Per channel, how far toward the mean a nonzero symbol decodes: to the centre of
        mass of its interval under the Laplace fit, not its midpoint (less error, same bits)."""
        shifts = []
        for layer in range(self.profile.num_layers):
            parts = []
            for part in range(2):
                b = self.profile.scale[layer, part].astype(np.float64)
                s = self.steps[layer, part].astype(np.float64)
                r = np.minimum(s / b, 50.0)
                shift = -0.5 * s + b - s / np.expm1(r)  # centroid of [|q|s - s/2, |q|s + s/2]
                parts.append(torch.from_numpy(shift.astype(np.float32)))
            shifts.append(parts)
        return shifts

    def bytes_per_token(self, spec: KVSpec) -> float:
        values = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
        return values * NOMINAL_BITS[self.level] / 8

    def max_error(self, layer: int, part: int) -> float:
        """Worst-case |decoded - original| of a value in this layer part (before rounding to
        the KV dtype): half a step, plus the centroid shift."""
        shift = self._centroid_shift[layer][part].abs()
        return float((torch.from_numpy(self.steps[layer, part]) / 2 + shift).max())

    # -- encoding ------------------------------------------------------------------------------

    def encode_layer(self, layer: int, kv: torch.Tensor, num_tokens: int,
                     first_position: int = 0) -> bytes:
        channels = kv.shape[-2] * kv.shape[-1]
        flat = kv.detach().to("cpu").reshape(2, -1, channels)[:, :num_tokens]
        sinks = max(0, min(num_tokens, SINK_TOKENS - first_position))
        out = [struct.pack("<I", sinks)]
        for part in range(2):
            out.append(self._encode_part(layer, part, flat[part, sinks:]))
        out.append(flat[:, :sinks].contiguous().view(torch.uint8).numpy().tobytes())
        return b"".join(out)

    def _encode_part(self, layer: int, part: int, x: torch.Tensor) -> bytes:
        mean = torch.from_numpy(self.profile.mean[layer, part])
        q = torch.round((x.float() - mean) / torch.from_numpy(self.steps[layer, part]))
        escaped = ~(q.abs() <= MAX_SYMBOL)  # NaN and inf escape too
        symbols = torch.where(escaped, ESCAPE, q + MAX_SYMBOL).to(torch.int32)
        symbols = symbols.t().contiguous().numpy()  # channel-major
        encoder = constriction.stream.queue.RangeEncoder()
        digest, models = self._models[layer][part]
        for channel in range(symbols.shape[0]):
            encoder.encode(symbols[channel], models[channel])
        words = encoder.get_compressed()
        where = escaped.t().contiguous().view(-1).nonzero().view(-1)
        exact = x.t().contiguous().view(-1)[where]
        return b"".join([_COUNTS.pack(digest, len(words), len(where)), words.tobytes(),
                         where.to(torch.int32).numpy().tobytes(),
                         exact.contiguous().view(torch.uint8).numpy().tobytes()])

    # -- decoding ------------------------------------------------------------------------------

    def decode_layer(self, layer: int, data: memoryview, spec: KVSpec, num_tokens: int) \
            -> torch.Tensor:
        channels = spec.num_kv_heads * spec.head_dim
        blocks = spec.num_blocks_for(num_tokens)
        elem = torch.empty((), dtype=spec.torch_dtype).element_size()
        out = torch.zeros(2, blocks * spec.block_size, channels, dtype=spec.torch_dtype)
        reader = _Reader(data, layer)
        sinks = reader.u32()
        if sinks > num_tokens:
            raise KVFormatError(f"CacheGen layer {layer}: {sinks} sink tokens of {num_tokens}")
        for part in range(2):
            out[part, sinks:num_tokens] = self._decode_part(
                layer, part, reader, num_tokens - sinks, channels, spec.torch_dtype, elem)
        raw = reader.take(2 * sinks * channels * elem)
        out[:, :sinks] = torch.frombuffer(bytearray(raw), dtype=spec.torch_dtype) \
            .view(2, sinks, channels) if sinks else out[:, :0]
        reader.finish()
        return out.view(2, blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)

    def _decode_part(self, layer: int, part: int, reader: _Reader, n: int, channels: int,
                     dtype: torch.dtype, elem: int) -> torch.Tensor:
        digest, num_words, num_escapes = reader.u32(), reader.u32(), reader.u32()
        expected, models = self._models[layer][part]
        if digest != expected:
            raise KVFormatError(f"CacheGen layer {layer}: coded with other entropy tables "
                                "(another profile build or constriction version)")
        if num_escapes > n * channels:
            raise KVFormatError(f"CacheGen layer {layer}: {num_escapes} escapes in "
                                f"{n * channels} values")
        words = np.frombuffer(reader.take(4 * num_words), dtype=np.uint32)
        decoder = constriction.stream.queue.RangeDecoder(words)
        try:
            symbols = np.stack([decoder.decode(models[c], n) for c in range(channels)])
        except Exception as e:  # constriction reports a malformed stream as a plain error
            raise KVFormatError(f"CacheGen layer {layer}: bad bitstream ({e})") from None
        if not decoder.maybe_exhausted():
            raise KVFormatError(f"CacheGen layer {layer}: bitstream longer than its symbols")
        q = torch.from_numpy(symbols.astype(np.float32)) - MAX_SYMBOL  # [channels, n]
        step = torch.from_numpy(self.steps[layer, part]).unsqueeze(1)
        mean = torch.from_numpy(self.profile.mean[layer, part]).unsqueeze(1)
        shift = self._centroid_shift[layer][part].unsqueeze(1)
        values = (q * step + q.sign() * shift + mean).reshape(-1)
        where = torch.from_numpy(np.frombuffer(reader.take(4 * num_escapes), dtype=np.int32)
                                 .astype(np.int64))
        exact = torch.frombuffer(bytearray(reader.take(num_escapes * elem)), dtype=dtype) \
            if num_escapes else torch.empty(0, dtype=dtype)
        if not np.array_equal(where.numpy(), np.flatnonzero(symbols.reshape(-1) == ESCAPE)):
            raise KVFormatError(f"CacheGen layer {layer}: escapes do not match the stream")
        values[where] = exact.float()
        return values.view(channels, n).t().to(dtype)


def _laplace_cdf(x: np.ndarray, b: np.ndarray) -> np.ndarray:
    half_tail = 0.5 * np.exp(-np.abs(x) / b)
    return np.where(x < 0, half_tail, 1.0 - half_tail)


class _Reader:
    """Bounds-checked reads from a layer section: a short or long section is a format error."""

    def __init__(self, data: memoryview, layer: int) -> None:
        self.data, self.offset, self.layer = memoryview(data), 0, layer

    def take(self, n: int) -> memoryview:
        if n < 0 or self.offset + n > len(self.data):
            raise KVFormatError(f"CacheGen layer {self.layer}: section is truncated")
        chunk = self.data[self.offset:self.offset + n]
        self.offset += n
        return chunk

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def finish(self) -> None:
        if self.offset != len(self.data):
            raise KVFormatError(f"CacheGen layer {self.layer}: {len(self.data) - self.offset} "
                                "bytes left over")
