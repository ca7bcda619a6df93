"""The KV object format: versioned header, checksum, lossless payload."""

from __future__ import annotations

import struct

import pytest
import torch

from tandem.engine.kv_cache import KVBlocks, KVSpec
from tandem.kv_store.errors import KVChecksumError, KVFormatError
from tandem.kv_store.kv_object import MAGIC, KVHeader, decode_kv, encode_kv

SPEC = KVSpec(num_layers=2, num_kv_heads=3, head_dim=8, dtype="bfloat16", block_size=4)


def kv_of(num_tokens: int, spec: KVSpec = SPEC) -> KVBlocks:
    shape = (spec.num_layers, 2, spec.num_blocks_for(num_tokens), spec.block_size,
             spec.num_kv_heads, spec.head_dim)
    return KVBlocks(spec, num_tokens, torch.randn(shape).to(spec.torch_dtype))


def test_round_trip_is_bit_exact():
    kv = kv_of(7)
    header, payload = encode_kv(kv, "model-a")
    back = decode_kv(KVHeader.decode(header.encode()), bytearray(payload))
    assert back.num_tokens == 7 and back.spec == SPEC
    assert torch.equal(back.data.view(torch.int16), kv.data.view(torch.int16))


def test_flipped_bit_is_caught_by_the_checksum():
    header, payload = encode_kv(kv_of(5), "model-a")
    damaged = bytearray(payload)
    damaged[100] ^= 0x10
    with pytest.raises(KVChecksumError, match="checksum"):
        decode_kv(header, damaged)


def test_truncated_payload_is_refused():
    header, payload = encode_kv(kv_of(5), "model-a")
    with pytest.raises(KVFormatError, match="payload is"):
        decode_kv(header, bytes(payload)[:-1])


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda b: b"XXXX" + b[4:], "not a KV object"),
    (lambda b: b[:4] + struct.pack("<H", 99) + b[6:], "version 99"),
    (lambda b: b[:8], "too short|does not match"),
    (lambda b: b[:11] + b"#" + b[12:], "malformed"),
    (lambda b: b.replace(b'"bfloat16"', b'"bfloat99"'), "malformed"),
])
def test_bad_headers_are_refused_with_a_reason(mutate, match):
    encoded = encode_kv(kv_of(3), "model-a")[0].encode()
    assert encoded.startswith(MAGIC)
    with pytest.raises(KVFormatError, match=match):
        KVHeader.decode(mutate(encoded))


def test_header_whose_sizes_disagree_is_refused():
    header, _ = encode_kv(kv_of(3), "model-a")
    lying = KVHeader(header.fingerprint, header.spec, 300, header.payload_bytes, header.checksum)
    with pytest.raises(KVFormatError, match="do not agree"):
        KVHeader.decode(lying.encode())


def test_kv_of_another_model_or_layout_is_incompatible():
    header, _ = encode_kv(kv_of(3), "model-a")
    header.check_compatible("model-a", SPEC)
    with pytest.raises(KVFormatError, match="model"):
        header.check_compatible("model-b", SPEC)
    with pytest.raises(KVFormatError, match="layout"):
        header.check_compatible("model-a", SPEC.model_copy(update={"block_size": 8}))
