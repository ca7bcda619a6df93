"""`OffloadPlacer`: the router's half that places requests with offloaded attention.

Whether a request is offloaded is decided at admission (`worker.offload.mode`): always, never,
or auto (prompt + max_tokens reaches `min_tokens`, or no decode worker has blocks for it). An
offloaded request gets a decode worker that holds no KV for it (it runs the dense layers), and
its prompt's token ranges on attention workers, by most free memory (DistAttention): the
prompt goes to the emptiest, and what does not fit continues on the next, each range on block
boundaries. The last range's holder is the tail, which takes new tokens; the other attention
workers, emptiest first, are where the sequence goes when the tail is full. The prefill worker
streams each range's KV straight to its holder; then the decode worker starts the request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tandem.cluster.errors import HandoffFailed
from tandem.cluster.routed import Placement, RoutedRequest
from tandem.decode_worker.offload import HolderAddress
from tandem.engine.errors import OutOfBlocksError
from tandem.prefill_worker.worker import PrefillResult
from tandem.transfer import TransportNotUsable, choose_receiver
from tandem.transfer.base import KVTarget
from tandem.transfer.ranges import RangeTarget
from tandem.worker_base import OffloadConfig, WorkerInfo

logger = logging.getLogger(__name__)


class OffloadPlacer:
    """Mixin of Router, which provides the pools, `_call` and the admission queue."""

    attention_workers: list[Any]
    attention_infos: list[WorkerInfo | None]
    attention_draining: set[int]  # attention slots that take no new range
    offload: OffloadConfig
    block_size: int
    num_offloaded: int

    def offload_wanted(self, req: RoutedRequest) -> bool | None:
        """True: offload; False: never; None: only if no decode worker has blocks (auto)."""
        if not self.attention_workers or self.offload.mode == "never":
            return False
        if self.offload.mode == "always":
            return True
        longest = len(req.prompt_token_ids) + req.params.max_tokens
        return True if longest >= self.offload.min_tokens else None

    async def _attention_order(self) -> list[tuple[int, int]]:
        """(slot, free blocks) of the attention workers that answer, most free first."""
        live = [i for i, info in enumerate(self.attention_infos)
                if info is not None and i not in self.attention_draining]
        stats = await asyncio.gather(*(self._call(self.attention_workers[i].stats.remote())
                                       for i in live), return_exceptions=True)
        free = [(i, s.engine.num_free_blocks) for i, s in zip(live, stats, strict=True)
                if not isinstance(s, BaseException)]
        return sorted(free, key=lambda p: -p[1])

    async def reserve_ranges(self, req: RoutedRequest, placed: Placement) -> bool:
        """Reserve the prompt's token ranges on attention workers, with room for max_tokens
        more on the tail; False when they have too little room together now (nothing is kept
        then). What does not fit on the tail is left to spilling."""
        n, bs = len(req.prompt_token_ids), self.block_size
        need = n + req.params.max_tokens
        order = await self._attention_order()
        if sum(free for _, free in order) * bs < need:
            return False
        plan, at = [], 0  # (slot, first token, prompt tokens, room) for the shares of `need`
        for slot, free in order:
            if at >= n:
                break
            share = min(need - at, free * bs)
            if share > 0:
                count = min(share, n - at)
                plan.append((slot, at, count, share - count))
                at += share
        placed.ranges, placed.attention = [], []
        for slot, first, count, room in plan:
            worker = self.attention_workers[slot]
            placed.attention.append(worker)  # before the call: a clean-up must reach it
            try:
                blocks = await self._call(
                    worker.reserve.remote(req.worker_id, first, count, room),
                    keep=OutOfBlocksError)
            except OutOfBlocksError:  # taken meanwhile: give back what was reserved
                await self._abort_on_workers(placed)
                placed.attention, placed.ranges = [], []
                return False
            placed.ranges.append((slot, first, count, blocks))
        used = {slot for slot, *_ in plan}
        placed.spill_to = [slot for slot, _ in order if slot not in used]
        # Spill holders too: if the decode worker dies, the router's clean-up frees them.
        placed.attention.extend(self.attention_workers[slot] for slot in placed.spill_to)
        return True

    def _holder(self, slot: int) -> HolderAddress:
        info = self.attention_infos[slot]
        assert info is not None
        return HolderAddress(f"attention-{slot}", info.channel)

    async def _prefill_offloaded(self, index: int, req: RoutedRequest,
                                 placed: Placement) -> PrefillResult:
        """Prefill with each range's KV streamed to its attention worker, then start the
        request on its decode worker."""
        ranges = []
        for slot, first, count, blocks in placed.ranges:
            info = self.attention_infos[slot]
            assert info is not None
            try:
                receiver, _ = choose_receiver(self.kv_transports[index], info.kv_receivers)
            except TransportNotUsable as e:
                raise HandoffFailed(str(e)) from None
            placed.transport = receiver.transport
            ranges.append(RangeTarget(KVTarget(receiver, tuple(blocks), count), first))
        n = len(req.prompt_token_ids)
        self.queued_prompt_tokens[index] = self.queued_prompt_tokens.get(index, 0) + n
        try:
            req.prefill = await self.prefill_workers[index].prefill_to_ranges.remote(
                req.worker_id, req.prompt_token_ids, req.params, ranges)
        finally:
            self.queued_prompt_tokens[index] -= n
        req.num_cached_tokens = req.prefill.num_cached_tokens
        await self._call(placed.decode.start_offloaded.remote(
            req.worker_id, req.prompt_token_ids, req.prefill.output_token_ids, req.params,
            [self._holder(slot) for slot, *_ in placed.ranges],
            [self._holder(slot) for slot in placed.spill_to]))
        self.num_offloaded += 1
        return req.prefill
