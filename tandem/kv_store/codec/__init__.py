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
    """Encodes one layer's KV, shape [2, num_blocks, block_size, kv_heads, head_dim], of which
    the first `num_tokens` token slots hold data (the rest is padding, decoded as zeros)."""

    name: str
    lossless: bool = True  # decoded KV equals the encoded KV: it may be reused as exact

    @abstractmethod
    def encode_layer(self, layer: int, kv: torch.Tensor, num_tokens: int,
                     first_position: int = 0) -> bytes:
        """`first_position`: where the first token sits in its sequence (lossy codecs keep the
        sequence's first tokens exact)."""

    @abstractmethod
    def decode_layer(self, layer: int, data: memoryview, spec: KVSpec, num_tokens: int) \
            -> torch.Tensor:
        """The layer's KV in `spec.dtype`; raises KVFormatError if `data` cannot be it."""

    def check(self, fingerprint: str, spec: KVSpec) -> None:
        """Raise KVFormatError unless this codec can code KV of this model and layout."""
        return None

    def bytes_per_token(self, spec: KVSpec) -> float:
        """Expected encoded size per token (a first guess until sizes are measured)."""
        return float(spec.bytes_per_token)


_CODECS: dict[str, Codec] = {}


def get_codec(name: str) -> Codec:
    """The codec a header names: `raw`, or `cachegen:<level>:<profile id>`."""
    codec = _CODECS.get(name)
    if codec is None:
        codec = _CODECS[name] = _make(name)
    return codec


def _make(name: str) -> Codec:
    from tandem.kv_store.codec.raw import RawCodec

    if name == "raw":
        return RawCodec()
    from tandem.kv_store.codec.cachegen import LEVELS, NAME, CacheGenCodec
    from tandem.kv_store.codec.profile import profile_by_id

    match = NAME.fullmatch(name)
    if match is None:
        raise KVFormatError(f"KV codec {name[:80]!r} is not supported (known: raw, "
                            f"cachegen:<level {min(LEVELS)}-{max(LEVELS)}>:<profile id>)")
    return CacheGenCodec(profile_by_id(match[2]), int(match[1]))


DEFAULT_LEVEL = 1


def codec_for(setting: str, fingerprint: str) -> Codec:
    """The codec a tier or transfer is configured with: `raw`, or `cachegen[:LEVEL]` with this
    model's profile (ValueError if the model has none: run `tandem cachegen-profile`)."""
    kind, _, level_text = setting.partition(":")
    if setting == "raw":
        return get_codec("raw")
    if kind != "cachegen" or (level_text and not level_text.isdigit()):
        raise ValueError(f"unknown KV codec {setting!r}; use raw or cachegen[:LEVEL]")
    level = int(level_text) if level_text else DEFAULT_LEVEL
    from tandem.kv_store.codec.profile import find_profile

    profile = find_profile(fingerprint)
    if profile is None:
        raise ValueError(f"no CacheGen profile for model {fingerprint!r}; build one with "
                         "`tandem cachegen-profile`")
    return get_codec(f"cachegen:{level}:{profile.id}")
