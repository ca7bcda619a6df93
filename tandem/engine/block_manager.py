"""KV block bookkeeping: free list, reference counts, and hash-chained prefix blocks.

A full block's hash covers the previous block's hash plus its own tokens, so equal hashes mean
equal prefixes; a hit is still confirmed by comparing the tokens. Freed blocks keep their
contents and hash until reused (least recently freed first), so later requests can hit them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from tandem.engine.sequence import Sequence


def chain_hash(prev: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(
        prev + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


def chain_seed(seq: Sequence) -> bytes:
    """What a sequence's first block hash chains from: its cache salt's own seed, so requests
    of different salts never share blocks."""
    salt = seq.params.cache_salt
    return b"" if salt is None else hashlib.blake2b(b"salt:" + salt.encode(),
                                                   digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_prefix_hits = 0  # blocks served from the prefix cache, for stats

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so that its table covers `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of `seq`, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        hits, prev = [], chain_seed(seq)
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            prev = chain_hash(prev, tokens)
            block = self.cached.get(prev)
            if block is None or self.block_tokens[block] != tuple(tokens):
                break
            hits.append(block)
        return hits

    def can_admit(self, seq: Sequence, hits: list[int], num_tokens: int) -> bool:
        """Whether `seq` can take `hits` and grow to `num_tokens` tokens right now."""
        reclaimed = sum(1 for b in hits if self.ref_counts[b] == 0)
        needed = self.blocks_needed(seq, num_tokens) - len(hits)  # net of blocks it holds
        return needed <= self.num_free_blocks - reclaimed

    def take_prefix(self, seq: Sequence, hits: list[int]) -> None:
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            seq.block_hashes.append(self.block_hash[block])  # type: ignore[arg-type]
        seq.block_table.extend(hits)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        self.num_prefix_hits += len(hits)

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` blocks for `num_tokens` tokens; False (nothing taken) if there are too few."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            return False
        # Ascending ids: blocks freed together come back adjacent, so KV transfers move them
        # as one run instead of one region per block (NIXL merges adjacent regions only).
        seq.block_table.extend(sorted(self._pop_free() for _ in range(needed)))
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish `seq`'s newly completed blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if seq.cacheable_tokens is not None:  # blended KV is approximate: never shared
            full = min(full, seq.cacheable_tokens // self.block_size)
        for i in range(len(seq.block_hashes), full):
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            prev = seq.block_hashes[-1] if seq.block_hashes else chain_seed(seq)
            h = chain_hash(prev, tokens)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached:
                self.cached[h] = block
                self.block_hash[block], self.block_tokens[block] = h, tuple(tokens)

    def free_blocks(self, seq: Sequence) -> None:
        # Release in reverse so a sequence's tail is reused before its (more shareable) head.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.block_table_epoch += 1

    def pin(self, blocks: list[int]) -> None:
        """One more reference to blocks in use: they stay allocated until `unpin`ned."""
        for block in blocks:
            assert self.ref_counts[block] > 0, f"block {block} is not in use"
            self.ref_counts[block] += 1

    def unpin(self, blocks: list[int]) -> None:
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None

    def _pop_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:
            if self.cached.get(h) == block:
                del self.cached[h]
            self.block_hash[block] = self.block_tokens[block] = None
        self.ref_counts[block] = 1
        return block
