"""The CacheGen codec: error bounds per level, determinism, sinks and escapes, bad streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem.engine.kv_cache import KVBlocks, KVSpec
from tandem.kv_store.codec import get_codec
from tandem.kv_store.codec.cachegen import LEVELS, CacheGenCodec
from tandem.kv_store.codec.profile import SINK_TOKENS, CacheGenProfile, profile_path
from tandem.kv_store.errors import KVChecksumError, KVFormatError
from tandem.kv_store.kv_object import decode_object, encode_object, header_length

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_size=4)
CHANNELS = 16


def profile() -> CacheGenProfile:
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 2, CHANNELS, generator=g).numpy()
    scale = (torch.rand(2, 2, CHANNELS, generator=g) + 0.5).numpy()
    step = np.full((2, 2, CHANNELS), 0.8, dtype=np.float32)
    return CacheGenProfile("model-a", 2, CHANNELS, mean, scale, step)


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The test profile, saved where `get_codec` looks for profiles."""
    from tandem.kv_store.codec import profile as profile_module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    profile_module._profiles_by_id.cache_clear()
    p = profile()
    p.save(profile_path(p.fingerprint, profile_module.cache_dir()))
    yield p
    profile_module._profiles_by_id.cache_clear()


def kv_of(num_tokens: int, seed: int = 1) -> KVBlocks:
    g = torch.Generator().manual_seed(seed)
    p = profile()
    shape = (2, 2, SPEC.num_blocks_for(num_tokens), 4, 2, 8)
    u = torch.rand(shape, generator=g) - 0.5  # Laplace samples, scale 1.2
    mean = torch.from_numpy(p.mean).view(2, 2, 1, 1, 2, 8)
    x = -1.2 * u.sign() * torch.log1p(-2 * u.abs()) + mean
    data = x.to(torch.bfloat16)
    flat = data.view(2, 2, -1, CHANNELS)
    flat[:, :, num_tokens:] = 0  # padding
    return KVBlocks(SPEC, num_tokens, data)


@pytest.mark.parametrize("level", list(LEVELS))
def test_round_trip_stays_within_the_levels_documented_error(installed, level):
    codec = CacheGenCodec(installed, level)
    kv = kv_of(30)
    back = decode_object(encode_object(kv, "model-a", codec, first_position=100), "model-a", SPEC)
    for layer in range(2):
        for part in range(2):
            x = kv.data[layer, part].float().reshape(-1, CHANNELS)[:30]
            y = back.data[layer, part].float().reshape(-1, CHANNELS)[:30]
            bound = codec.max_error(layer, part) + x.abs() * 2**-8  # + rounding to bf16
            assert bool(((x - y).abs() <= bound).all()), (level, layer, part)
    assert bool((back.data.view(2, 2, -1, CHANNELS)[:, :, 30:] == 0).all())  # padding


def test_lower_levels_are_smaller_and_all_beat_bf16(installed):
    kv = kv_of(256)
    sizes = [len(encode_object(kv, "model-a", CacheGenCodec(installed, level), 300))
             for level in LEVELS]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] < kv.data.numel() * 2


def test_identical_input_gives_identical_bytes(installed):
    codec = CacheGenCodec(installed, 2)
    assert encode_object(kv_of(40), "model-a", codec) == encode_object(kv_of(40), "model-a",
                                                                       codec)


def test_sink_tokens_and_escaped_outliers_come_back_exact(installed):
    codec = CacheGenCodec(installed, 3)
    kv = kv_of(20)
    kv.data.view(2, 2, -1, CHANNELS)[1, 0, 10, 3] = 300.0  # far beyond the largest symbol
    back = decode_object(encode_object(kv, "model-a", codec, first_position=0), "model-a", SPEC)
    flat_in, flat_out = kv.data.view(2, 2, -1, CHANNELS), back.data.view(2, 2, -1, CHANNELS)
    assert torch.equal(flat_out[:, :, :SINK_TOKENS], flat_in[:, :, :SINK_TOKENS])
    assert flat_out[1, 0, 10, 3].item() == 300.0
    later = decode_object(encode_object(kv, "model-a", codec, first_position=64), "model-a",
                          SPEC)
    assert not torch.equal(later.data.view(2, 2, -1, CHANNELS)[:, :, :SINK_TOKENS],
                           flat_in[:, :, :SINK_TOKENS])  # mid-sequence: no sinks to keep


def test_a_stream_for_another_model_or_layout_is_refused(installed):
    blob = encode_object(kv_of(8), "model-a", CacheGenCodec(installed, 1))
    with pytest.raises(KVFormatError, match="model"):
        decode_object(blob, "model-b", SPEC)
    with pytest.raises(KVFormatError, match="layout"):
        decode_object(blob, "model-a", SPEC.model_copy(update={"block_size": 8}))


def test_a_stream_naming_an_unknown_profile_is_refused(installed):
    with pytest.raises(KVFormatError, match="profile 0123456789abcdef is not on this machine"):
        get_codec("cachegen:1:0123456789abcdef")
    for name in (f"cachegen:9:{installed.id}", f"cachegen:01:{installed.id}",
                 f"cachegen:\u00b2:{installed.id}", "zip"):
        with pytest.raises(KVFormatError, match="not supported"):
            get_codec(name)


def test_a_stream_coded_with_another_models_profile_is_refused(installed):
    blob = encode_object(kv_of(8), "model-b", CacheGenCodec(installed, 1))  # model-a's profile
    with pytest.raises(KVFormatError, match="is for model 'model-a'"):
        decode_object(blob, "model-b", SPEC)


def test_nan_and_inf_escape_and_come_back_as_they_were(installed):
    kv = kv_of(12)
    flat = kv.data.view(2, 2, -1, CHANNELS)
    flat[0, 1, 7, 2], flat[1, 0, 9, 5] = float("nan"), float("inf")
    back = decode_object(encode_object(kv, "model-a", CacheGenCodec(installed, 2), 50),
                         "model-a", SPEC).data.view(2, 2, -1, CHANNELS)
    assert back[0, 1, 7, 2].isnan() and back[1, 0, 9, 5].item() == float("inf")


def test_truncation_and_bit_flips_are_caught(installed):
    blob = encode_object(kv_of(64), "model-a", CacheGenCodec(installed, 2))
    with pytest.raises(KVFormatError):
        decode_object(blob[:-7], "model-a", SPEC)
    start = header_length(blob)
    for offset in (start + 5, start + 40, len(blob) - 3):
        damaged = bytearray(blob)
        damaged[offset] ^= 0x08
        with pytest.raises(KVChecksumError):
            decode_object(bytes(damaged), "model-a", SPEC)


def test_a_truncated_or_padded_section_is_refused_even_without_the_checksum(installed):
    codec = CacheGenCodec(installed, 2)
    kv = kv_of(64)
    section = codec.encode_layer(0, kv.data[0], 64, 100)
    with pytest.raises(KVFormatError):
        codec.decode_layer(0, memoryview(section[:-5]), SPEC, 64)
    with pytest.raises(KVFormatError):
        codec.decode_layer(0, memoryview(section + b"\x00"), SPEC, 64)
