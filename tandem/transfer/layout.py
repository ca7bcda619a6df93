"""Pieces of a request's KV: where they sit in pool memory, their checksums, and the receiver's
record of which pieces arrived.

A piece is `layers` x the request's blocks [first_block, first_block + num_blocks). Its bytes,
in order, are layer by layer, K then V, block by block: exactly what `KVCache.gather` returns,
so a gRPC payload and the memory a NIXL WRITE fills hash the same. A whole transfer is checked
by each piece's checksum and, in the KV header, the XXH3-64 of all piece checksums in
(layer, block) order.

A piece's checksum is XXH3-64 of its bytes (`xxh3`), except where a NIXL sender's pool is on a
GPU: there it is `word64`, a hash computed on the device where the blocks live (copying each
piece to the host to hash it would stall the stream every piece). `word64` is defined in
integer tensor arithmetic, so a CPU receiver computes exactly the same value; the sender names
the kind in each piece's notification.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import xxhash

from tandem.engine.kv_cache import KVCache, KVSpec
from tandem.kv_store import kv_object
from tandem.kv_store.kv_object import KVHeader


@dataclass(frozen=True)
class Piece:
    layers: range
    first_block: int
    num_blocks: int
    checksum: int = 0

    def num_bytes(self, spec: KVSpec) -> int:
        return len(self.layers) * 2 * self.num_blocks * spec.bytes_per_region

    @property
    def blocks(self) -> range:
        return range(self.first_block, self.first_block + self.num_blocks)


SPLIT_BYTES = 4 << 20


def split_layers(spec: KVSpec, layers: range, num_blocks: int,
                 max_bytes: int = SPLIT_BYTES) -> list[range]:
    """`layers` cut into groups of at most `max_bytes` of KV (at least one layer each), so a
    big piece travels as several, each checked on arrival while the next is on its way."""
    per_layer = 2 * num_blocks * spec.bytes_per_region
    step = max(1, max_bytes // max(per_layer, 1))
    return [range(lo, min(lo + step, layers.stop)) for lo in range(layers.start, layers.stop, step)]


def pool_runs(spec: KVSpec, layers: range, pool_blocks: int, block_ids: list[int]) \
        -> list[tuple[int, int]]:
    """(byte offset, length) runs of a piece in a pool, in piece order; adjacent blocks merge."""
    region, runs = spec.bytes_per_region, []
    for row in range(layers.start * 2, layers.stop * 2):  # (layer, K|V) rows of the pool
        start = 0
        for i in range(1, len(block_ids) + 1):
            if i == len(block_ids) or block_ids[i] != block_ids[i - 1] + 1:
                runs.append(((row * pool_blocks + block_ids[start]) * region,
                             (i - start) * region))
                start = i
    return runs


CHECKSUM_KINDS = ("xxh3", "word64")
_MIX1, _MIX2, _MIX3 = 0x9E3779B97F4A7C15 - (1 << 64), 0x632BE59BD9B4E019, 0x2545F4914F6CDD1D


def native_checksum_kind(cache: KVCache) -> str:
    """The kind a sender computes where its pool lives."""
    return "xxh3" if cache.data.device.type == "cpu" else "word64"


def piece_checksum(cache: KVCache, layers: range, block_ids: list[int],
                   kind: str | None = None) -> int:
    """The checksum of a piece as it sits in `cache` at `block_ids` (default kind: the pool's
    native one)."""
    kind = kind or native_checksum_kind(cache)
    if kind == "word64":
        return word64_checksum(cache.gather(layers, block_ids))
    if kind != "xxh3":
        raise ValueError(f"unknown checksum kind {kind!r}; known: {', '.join(CHECKSUM_KINDS)}")
    if cache.data.device.type != "cpu":
        return checksum_bytes(cache.gather(layers, block_ids).cpu())
    pool = memoryview(cache.data.view(torch.uint8).view(-1).numpy())
    digest = xxhash.xxh3_64()
    for offset, size in pool_runs(cache.spec, layers, cache.num_blocks, block_ids):
        digest.update(pool[offset:offset + size])
    return digest.intdigest()


WORD64_SLICE = 1 << 22  # words hashed at a time: int64 temporaries stay ~100 MB


def word64_checksum(data: torch.Tensor) -> int:
    """A 64-bit hash of a tensor's bytes, computed where the tensor lives: each 32-bit word is
    mixed with its index (so moved words change the result) and the mixes are summed, in
    wrapping int64 arithmetic, which CPU and CUDA do alike. Only the result crosses to the host.
    Wrapping addition is associative, so hashing in slices gives the same sum."""
    words = data.contiguous().view(torch.int32).reshape(-1)
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), WORD64_SLICE):
        part = words[start:start + WORD64_SLICE].to(torch.int64) & 0xFFFFFFFF
        x = part * _MIX2 + (torch.arange(part.numel(), device=part.device) + start) * _MIX1
        x = (x ^ ((x >> 31) & 0x1FFFFFFFF)) * _MIX3
        total += (x ^ ((x >> 29) & 0x7FFFFFFFF)).sum()
    return int(total) & 0xFFFFFFFFFFFFFFFF


def checksum_bytes(data: torch.Tensor | bytes | bytearray | memoryview) -> int:
    if isinstance(data, torch.Tensor):
        data = memoryview(data.contiguous().view(torch.uint8).view(-1).numpy())
    return xxhash.xxh3_64_intdigest(data)


def transfer_header(fingerprint: str, spec: KVSpec, num_tokens: int, checksum: int = 0) \
        -> KVHeader:
    """The KV header of a transfer (its checksum is `combined_checksum` of the pieces)."""
    return KVHeader(fingerprint, spec, num_tokens,
                    spec.num_blocks_for(num_tokens) * spec.bytes_per_block, checksum)


def combined_checksum(pieces: list[Piece]) -> int:
    """The checksum of a whole transfer: over its piece checksums in (layer, block) order."""
    ordered = sorted(pieces, key=lambda p: (p.layers.start, p.first_block))
    return kv_object.combined_checksum([p.checksum for p in ordered])


class Reception:
    """The receiver's record of one request's incoming KV: every (layer, block) must arrive
    exactly once and check out before the request may start."""

    def __init__(self, spec: KVSpec, num_tokens: int) -> None:
        self.spec, self.num_tokens = spec, num_tokens
        self.num_blocks = spec.num_blocks_for(num_tokens)
        self._seen = bytearray(spec.num_layers * self.num_blocks)
        self.pieces: list[Piece] = []
        self.error: str | None = None  # set when a piece failed its check

    def mark_present(self, num_blocks: int) -> None:
        """The leading `num_blocks` blocks (every layer) are in place and checked already, by
        an earlier transfer of the same request (a migration's pre-copy): none may arrive."""
        if not 0 <= num_blocks <= self.num_blocks:
            raise ValueError(f"{num_blocks} blocks in place, the KV has {self.num_blocks}")
        for layer in range(self.spec.num_layers):
            row = layer * self.num_blocks
            self._seen[row:row + num_blocks] = b"\x01" * num_blocks

    def check(self, piece: Piece) -> None:
        """Raise ValueError unless `piece` lies inside the request and is new."""
        layers, blocks = piece.layers, piece.blocks
        if not (0 <= layers.start < layers.stop <= self.spec.num_layers) \
                or not (0 <= blocks.start < blocks.stop <= self.num_blocks):
            raise ValueError(f"piece layers {layers.start}..{layers.stop} x blocks "
                             f"{blocks.start}..{blocks.stop} lies outside the request's KV "
                             f"({self.spec.num_layers} layers x {self.num_blocks} blocks)")
        for layer in layers:
            row = layer * self.num_blocks
            if any(self._seen[row + b] for b in blocks):
                raise ValueError(f"piece overlaps KV already received (layer {layer})")

    def add(self, piece: Piece) -> None:
        self.check(piece)
        for layer in piece.layers:
            row = layer * self.num_blocks
            self._seen[row + piece.first_block:row + piece.first_block + piece.num_blocks] = \
                b"\x01" * piece.num_blocks
        self.pieces.append(piece)

    def missing(self) -> int:
        """(layer, block) regions not received yet."""
        return self._seen.count(0)
