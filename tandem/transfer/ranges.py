"""One request's KV to several receivers, by token range (attention offload, DistAttention).

A sequence whose KV is split over attention workers gets one `KVTarget` per range, each range
starting on a block boundary. `RangedSession` is a `SendSession` over one session per range:
each posted piece (layers x a run of the request's blocks) is cut at the range boundaries and
each part goes to its range's session, renumbered from that range's first block. Every part
travels with the transport's usual checks; `finish` succeeds only when every range landed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tandem.transfer.base import Handoff, KVTarget, SendSession


@dataclass(frozen=True)
class RangeTarget:
    """Where the KV of tokens [first_token, first_token + target.num_tokens) goes."""

    target: KVTarget
    first_token: int  # a multiple of the block size


class RangedSession(SendSession):
    def __init__(self, parts: list[tuple[int, int, SendSession]]) -> None:
        """`parts`: (first block, number of blocks, session) per range, in token order."""
        self.parts = parts

    def post(self, layers: range, first_block: int, src_blocks: list[int]) -> None:
        end = first_block + len(src_blocks)
        for start, count, session in self.parts:
            lo, hi = max(first_block, start), min(end, start + count)
            if lo < hi:
                session.post(layers, lo - start, src_blocks[lo - first_block:hi - first_block])

    async def finish(self, handoff: Handoff, timeout: float) -> None:
        results = await asyncio.gather(*(s.finish(handoff, timeout) for _, _, s in self.parts),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def abort(self) -> None:
        await asyncio.gather(*(s.abort() for _, _, s in self.parts), return_exceptions=True)


def check_ranges(ranges: list[RangeTarget], num_tokens: int, block_size: int) -> None:
    """The ranges must tile [0, num_tokens) in order, each starting on a block boundary."""
    at = 0
    for r in ranges:
        if r.first_token != at:
            raise ValueError(f"KV ranges must tile the prompt in order; a range starts at "
                             f"token {r.first_token}, expected {at}")
        if at % block_size:
            raise ValueError(f"KV ranges must start on block boundaries ({block_size} "
                             f"tokens); one starts at token {at}")
        at += r.target.num_tokens
    if at != num_tokens:
        raise ValueError(f"KV ranges cover {at} tokens; the prompt has {num_tokens}")
