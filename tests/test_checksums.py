"""Piece checksums: the device-side kind equals its integer definition on any device, and
catches flipped and moved data."""

from __future__ import annotations

import torch

from tandem.engine.kv_cache import KVCache, KVSpec
from tandem.transfer.layout import piece_checksum, word64_checksum

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_size=4)
M64 = (1 << 64) - 1


def reference_word64(data: torch.Tensor) -> int:
    """word64 in plain Python integers, modulo 2**64."""
    words = data.contiguous().view(torch.int32).reshape(-1).tolist()
    total = 0
    for i, w in enumerate(words):
        x = ((w & 0xFFFFFFFF) * 0x632BE59BD9B4E019 + i * 0x9E3779B97F4A7C15) & M64
        x = ((x ^ (x >> 31)) * 0x2545F4914F6CDD1D) & M64
        total = (total + (x ^ (x >> 29))) & M64
    return total


def test_word64_equals_its_integer_definition():
    data = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert word64_checksum(data) == reference_word64(data)


def test_word64_catches_a_flipped_bit_and_swapped_words():
    data = torch.randn(64, generator=torch.Generator().manual_seed(1))
    base = word64_checksum(data)
    flipped = data.clone()
    flipped.view(torch.int32)[17] ^= 1 << 9
    swapped = data.clone()
    swapped[[3, 40]] = data[[40, 3]]
    assert len({base, word64_checksum(flipped), word64_checksum(swapped)}) == 3


def test_a_cpu_pool_computes_either_kind_of_a_piece():
    cache = KVCache(SPEC, 6, torch.device("cpu"))
    cache.data.copy_(torch.randn(cache.data.shape, generator=torch.Generator().manual_seed(2)))
    blocks = [4, 1, 2]
    piece = cache.gather(range(0, 2), blocks)
    assert piece_checksum(cache, range(0, 2), blocks, "word64") == word64_checksum(piece)
    assert piece_checksum(cache, range(0, 2), blocks) == piece_checksum(cache, range(0, 2),
                                                                        blocks, "xxh3")
    assert piece_checksum(cache, range(0, 2), blocks) != word64_checksum(piece)
