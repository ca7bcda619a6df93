"""The KV object format: versioned header, per-layer sections with checksums, lossless raw."""

from __future__ import annotations

import struct

import pytest
import torch

from tandem.engine.kv_cache import KVBlocks, KVSpec
from tandem.kv_store.codec import get_codec
from tandem.kv_store.errors import KVChecksumError, KVFormatError
from tandem.kv_store.kv_object import (
    MAGIC,
    KVHeader,
    decode_layers,
    decode_object,
    encode_object,
    header_length,
    read_header,
)

SPEC = KVSpec(num_layers=2, num_kv_heads=3, head_dim=8, dtype="bfloat16", block_size=4)
RAW = get_codec("raw")


def kv_of(num_tokens: int, spec: KVSpec = SPEC) -> KVBlocks:
    shape = (spec.num_layers, 2, spec.num_blocks_for(num_tokens), spec.block_size,
             spec.num_kv_heads, spec.head_dim)
    return KVBlocks(spec, num_tokens, torch.randn(shape).to(spec.torch_dtype))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_round_trip_is_bit_exact():
    kv = kv_of(7)
    back = decode_object(encode_object(kv, "model-a", RAW), "model-a", SPEC)
    assert back.num_tokens == 7 and back.spec == SPEC
    assert same(back.data, kv.data)


def test_one_layer_decodes_from_its_own_section():
    kv = kv_of(9)
    blob = encode_object(kv, "model-a", RAW)
    header = read_header(blob, "model-a", SPEC)
    offset, length = header.layer_span(range(1, 2))
    start = header_length(blob) + offset
    layer = decode_layers(header, blob[start:start + length], range(1, 2))
    assert same(layer[0], kv.data[1])


@pytest.mark.parametrize("where", ["first layer", "last layer"])
def test_flipped_bit_is_caught_by_the_checksum(where):
    blob = bytearray(encode_object(kv_of(5), "model-a", RAW))
    blob[header_length(blob) + 3 if where == "first layer" else -3] ^= 0x10
    with pytest.raises(KVChecksumError, match="checksum"):
        decode_object(blob, "model-a", SPEC)


def test_truncated_object_is_refused():
    blob = encode_object(kv_of(5), "model-a", RAW)
    with pytest.raises(KVFormatError, match="payload is"):
        decode_object(blob[:-1], "model-a", SPEC)
    with pytest.raises(KVFormatError):
        decode_object(blob[:5], "model-a", SPEC)


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda b: b"XXXX" + b[4:], "not a KV object"),
    (lambda b: b[:4] + struct.pack("<H", 99) + b[6:], "version 99"),
    (lambda b: b[:8], "too short|does not match"),
    (lambda b: b[:11] + b"#" + b[12:], "malformed"),
    (lambda b: b.replace(b'"bfloat16"', b'"bfloat99"'), "malformed"),
])
def test_bad_headers_are_refused_with_a_reason(mutate, match):
    encoded = KVHeader("model-a", SPEC, 3, SPEC.bytes_per_block, 0).encode()
    assert encoded.startswith(MAGIC)
    with pytest.raises(KVFormatError, match=match):
        KVHeader.decode(mutate(encoded))


def test_header_whose_sizes_disagree_is_refused():
    lying = KVHeader("model-a", SPEC, 300, SPEC.bytes_per_block, 0)
    with pytest.raises(KVFormatError, match="do not agree"):
        KVHeader.decode(lying.encode())
    sections = KVHeader("model-a", SPEC, 3, 10, 0, "raw", (4, 5), (1, 2))
    with pytest.raises(KVFormatError, match="layer sections"):
        KVHeader.decode(sections.encode())


def test_unknown_codec_is_refused():
    header = KVHeader("model-a", SPEC, 3, 9, 0, "zip9", (4, 5), (1, 2))
    with pytest.raises(KVFormatError, match="codec 'zip9'"):
        KVHeader.decode(header.encode())


def test_kv_of_another_model_or_layout_is_incompatible():
    blob = encode_object(kv_of(3), "model-a", RAW)
    with pytest.raises(KVFormatError, match="model"):
        decode_object(blob, "model-b", SPEC)
    with pytest.raises(KVFormatError, match="layout"):
        decode_object(blob, "model-a", SPEC.model_copy(update={"block_size": 8}))


def test_a_transfer_header_is_not_stored_kv():
    header = KVHeader("model-a", SPEC, 3, SPEC.bytes_per_block, 0).encode()
    with pytest.raises(KVFormatError, match="transfer"):
        read_header(header, "model-a", SPEC)


def test_a_damaged_header_field_is_caught_even_when_the_sizes_still_fit():
    blob = encode_object(kv_of(8), "model-a", RAW)  # 2 blocks: 5 tokens would still fit
    tampered = blob.replace(b'"num_tokens": 8', b'"num_tokens": 5')
    assert tampered != blob
    with pytest.raises(KVChecksumError, match="header"):
        decode_object(tampered, "model-a", SPEC)
    with pytest.raises(KVFormatError, match="malformed"):
        decode_object(blob.replace(b'"num_tokens": 8', b'"num_tokens": 1e999'), "model-a", SPEC)


def test_an_object_held_as_a_tensor_decodes_where_it_lies():
    from tandem.kv_store.kv_object import decode_object, decode_tensor, encode_object

    spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_size=4)
    data = torch.randn(2, 2, 3, 4, 2, 8, generator=torch.Generator().manual_seed(3))
    kv = KVBlocks(spec, 10, data.to(torch.bfloat16))
    blob = encode_object(kv, "fp", get_codec("raw"))
    held = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    got = decode_tensor(held, "fp", spec, num_tokens=10)
    assert torch.equal(got.data, decode_object(blob, "fp", spec).data)
    assert torch.equal(got.data, kv.data)
    assert (len(blob) - kv.data.numel() * 2) % 16 == 0  # the header pads the payload aligned
    assert got.data.untyped_storage().data_ptr() == held.untyped_storage().data_ptr()  # a view
    with pytest.raises(KVFormatError, match="expected 12"):
        decode_tensor(held, "fp", spec, num_tokens=12)
    with pytest.raises(KVFormatError, match="payload"):
        decode_tensor(held[:-2], "fp", spec)
