"""`BlockPool`: the free KV blocks of an attention worker, handed out so that each sequence's
blocks form as few contiguous runs as possible.

A run of consecutive blocks is one strided view of the pool, which the CPU attention reads in
place; a sequence in several runs needs one kernel call per run (merged exactly by LSE), and a
gather would copy its whole KV every layer. So a sequence's next block is the one right after
its last when that is free, and otherwise the lowest free block (a fresh run).
"""

from __future__ import annotations

import heapq


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self._heap = list(range(num_blocks))  # may hold stale ids: `_free` is the truth
        self._free = set(self._heap)

    def __len__(self) -> int:
        return len(self._free)

    def take(self, count: int, after: int | None = None) -> list[int]:
        """`count` free blocks (the caller checked there are enough), continuing the run that
        ends at block `after` while they are free."""
        if count > len(self._free):
            raise ValueError(f"{count} blocks asked for, {len(self._free)} free")
        taken: list[int] = []
        following = None if after is None else after + 1
        while len(taken) < count:
            if following is not None and following in self._free:
                block = following
            else:
                block = heapq.heappop(self._heap)
                if block not in self._free:  # taken as a `following` block earlier
                    continue
            self._free.remove(block)
            taken.append(block)
            following = block + 1
        return taken

    def give(self, blocks: list[int]) -> None:
        for block in blocks:
            if block not in self._free:
                self._free.add(block)
                heapq.heappush(self._heap, block)


def runs_of(blocks: list[int], num_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """The maximal runs of consecutive blocks holding the first `num_tokens` tokens, as
    (first block, tokens in the run)."""
    runs: list[tuple[int, int]] = []
    left = num_tokens
    for block in blocks[:-(-num_tokens // block_size)] if num_tokens else []:
        tokens = min(block_size, left)
        left -= tokens
        if runs and runs[-1][0] + -(-runs[-1][1] // block_size) == block \
                and runs[-1][1] % block_size == 0:
            runs[-1] = (runs[-1][0], runs[-1][1] + tokens)
        else:
            runs.append((block, tokens))
    return runs
