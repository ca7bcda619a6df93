"""`Migrator`: the router's half that moves running requests between decode workers (Llumnix).

A move of a request from decode worker A (its `Placement`) to decode worker B:
1. `start_move`, in the background while the stream goes on from A: B (not draining, most
   room) reserves blocks for the tokens of the request's full blocks, and A pre-copies their
   KV there (`precopy`); then A suspends the request (it leaves A's batch, keeping its KV).
2. The relay reads A's last tokens and its "migrated" delta and raises RequestMoving;
   `migrate` has B extend its reservation to every token but the last, and A sends the KV of
   the remaining blocks (`send_request`). B adopts the request, holding its last token as
   already sent, and the relay goes on polling B.
The stream loses and repeats nothing: B's request is the prompt plus the output so far, and
B's first delta skips the one token the client has. Only stage 2 stalls the stream. If the
pre-copy fails, stage 2 sends everything; if the move cannot happen at all (A cannot suspend
it yet, no other worker has room, the transfer fails), the request resumes by re-prefill
(`resume`). Drains move every request off a worker; the rebalancer one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from tandem.cluster.errors import WorkerUnavailable
from tandem.cluster.routed import Placement, RoutedRequest
from tandem.engine.errors import OutOfBlocksError
from tandem.engine.handoff import RequestKV
from tandem.transfer import choose_receiver
from tandem.transfer.base import ReceiverInfo

logger = logging.getLogger(__name__)


@dataclass
class MoveTarget:
    """Where a moving request goes: B's placement, and the blocks the pre-copy filled."""

    placed: Placement
    slot: int
    receiver: ReceiverInfo
    num_blocks: int = 0


@dataclass
class Move:
    suspended: RequestKV  # the request on A, out of its batch
    target: MoveTarget | None  # None when the pre-copy did not happen


class Migrator:
    decode_workers: list[Any]
    kv_receivers: list[tuple[ReceiverInfo, ...]]
    active: dict[str, Placement]
    call_timeout_s: float
    handoff_timeout_s: float
    block_size: int
    migrations: Counter[str]  # transport -> requests moved with it
    draining: set[int]  # decode slots that take no new request

    async def evict(self, slot: int) -> int:
        """Drain decode slot `slot`: it gets no new request, and each request it runs moves
        to another decode worker, with its KV (`migrate`; by re-prefill of its prompt and
        tokens so far when that cannot be done). The client's stream goes on. The number of
        requests moved."""
        self.draining.add(slot)
        actor = self.decode_workers[slot]
        moving = [p for p in self.active.values()
                  if p.decode is actor and not p.aborted and p.moving is None]
        for placed in moving:
            self.start_move(placed)
        await asyncio.gather(*(p.moving for p in moving), return_exceptions=True)
        return len(moving)

    @property
    def num_migrated(self) -> int:
        return sum(self.migrations.values())

    def start_move(self, placed: Placement) -> None:
        """Pre-copy a running request's KV to another decode worker and suspend it there;
        its relay then calls `migrate`. If it cannot be suspended, it is aborted on its worker
        and resumes by re-prefill."""
        async def prepare() -> Move:
            target = None
            try:
                if placed.decode_slot is None or not self.kv_receivers[placed.decode_slot]:
                    raise WorkerUnavailable("its decode worker receives no KV (colocated)")
                try:
                    target = placed.move_target = await self._precopy(placed)
                except Exception as e:  # stage 2 then carries all of the KV
                    logger.info("request %s: pre-copy failed (%s); it moves in one piece",
                                placed.worker_id, e)
                placed.moving_since = time.perf_counter()
                suspended = await self._call(placed.decode.suspend.remote(placed.worker_id))
                return Move(suspended, target)
            except Exception as e:  # not movable (its KV is still arriving, or preempted)
                logger.info("request %s cannot move with its KV (%s); it resumes by "
                            "re-prefill", placed.worker_id, e)
                if target is not None:
                    self._clean_up_later(target.placed)
                placed.move_target = None
                placed.evicted = True  # the relay reads the abort as a move
                await self._abort_on_workers(placed)
                raise

        placed.moving = asyncio.ensure_future(prepare())
        placed.moving.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _precopy(self, placed: Placement) -> MoveTarget | None:
        """Stage 1: reserve on another decode worker and copy the KV of the request's full
        blocks there; None when it has too few to be worth it."""
        req, generated = placed.origin, placed.generated
        assert req is not None and generated is not None and placed.decode_slot is not None
        known = [*req.prompt_token_ids, *generated]
        # Strictly fewer tokens than A's KV will cover at the suspend: stage 2 sends >= 1 block.
        num_blocks = (len(known) - 2) // self.block_size
        if num_blocks < 1 or not generated:  # nothing to copy, or not decoding yet
            return None
        moved = replace(req, prompt_token_ids=known[:num_blocks * self.block_size],
                        params=req.params.after(len(generated) - 1), segments=None,
                        worker_id=uuid.uuid4().hex)
        target = await self._reserve_moved(moved, placed.decode_slot)
        try:
            await asyncio.wait_for(placed.decode.precopy.remote(
                placed.worker_id, target.receiver, target.placed.block_ids, moved.worker_id,
                num_blocks), self.handoff_timeout_s + self.call_timeout_s)
        except BaseException:
            self._clean_up_later(target.placed)
            raise
        target.num_blocks = num_blocks
        return target

    async def migrate(self, req: RoutedRequest, generated: list[int], placed: Placement) \
            -> tuple[RoutedRequest, Placement]:
        """Stage 2: continue `req`, suspended on `placed`'s decode worker, on the move's
        target; resumes it by re-prefill when that fails."""
        target: MoveTarget | None = None
        try:
            assert placed.moving is not None and placed.decode_slot is not None
            move = await placed.moving
            target, placed.move_target = move.target, None
            tokens = [*req.prompt_token_ids, *generated]
            if move.suspended.token_ids != tokens:
                raise WorkerUnavailable(f"the decode worker holds "
                                        f"{len(move.suspended.token_ids)} tokens, the stream "
                                        f"has {len(tokens)}")
            params = req.params.after(len(generated) - 1)
            if target is None:
                moved = replace(req, prompt_token_ids=tokens[:-1], params=params,
                                segments=None, worker_id=uuid.uuid4().hex)
                target = await self._reserve_moved(moved, placed.decode_slot)
            else:
                pre = target.num_blocks * self.block_size
                target.placed.block_ids = await self._call(target.placed.decode.extend.remote(
                    target.placed.worker_id, tokens[pre:-1], params))
            self.active[req.request_id] = target.placed
            await asyncio.wait_for(placed.decode.send_request.remote(
                placed.worker_id, target.receiver, target.placed.block_ids,
                target.placed.worker_id, target.num_blocks),
                self.handoff_timeout_s + self.call_timeout_s)
            self.migrations[target.receiver.transport] += 1
            logger.info("request %s moved to decode slot %d with its KV (%d tokens over %s, "
                        "%d blocks pre-copied) %.0f ms after its suspend", req.request_id,
                        target.slot, len(tokens) - 1, target.receiver.transport,
                        target.num_blocks, (time.perf_counter() - placed.moving_since) * 1e3)
            moved = replace(req, prompt_token_ids=tokens[:-1], params=params, segments=None,
                            worker_id=target.placed.worker_id, prefill=None,
                            prefill_worker=None)
            return moved, target.placed
        except Exception as e:
            if target is not None:
                self._clean_up_later(target.placed)  # the blocks reserved on the target
            if placed.aborted or (target is not None and target.placed.aborted):
                placed.aborted = True
                return req, placed
            return await self.resume(req, generated, placed, e)

    async def _reserve_moved(self, moved: RoutedRequest, source: int) -> MoveTarget:
        """Blocks for a moving request on the decode worker with the most room (not its
        source, not draining); WorkerUnavailable when none has room now."""
        for slot in await self._decode_order():
            if slot == source:
                continue
            try:
                receiver, _ = choose_receiver(
                    tuple(r.transport for r in self.kv_receivers[source]),
                    self.kv_receivers[slot])
            except Exception:  # no transport in common
                continue
            placed = Placement(worker_id=moved.worker_id, decode=self.decode_workers[slot],
                               decode_slot=slot, transport=receiver.transport)
            try:
                placed.block_ids = await self._call(placed.decode.reserve.remote(
                    moved.worker_id, moved.prompt_token_ids, moved.params, 1),
                    keep=OutOfBlocksError)
            except OutOfBlocksError:
                continue
            return MoveTarget(placed, slot, receiver)
        raise WorkerUnavailable("no other decode worker has room for it now")
