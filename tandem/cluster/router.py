"""`Router`: place each request on a prefill and a decode worker and relay its tokens.

Per request: admit (a bounded FIFO; only its head asks the decode workers for blocks, again
when a request ends) -> reserve KV blocks on a decode worker (most free blocks, then smallest
batch) -> prefill on the prefill worker with the least work ahead of it (queued prompt tokens
plus the tokens it would compute, after the prefix chunks its local KV tiers hold), which
pushes the KV to the decode worker -> poll the decode worker for token deltas (each poll has a
deadline, and renews the worker's lease on the request) until the request finishes. If the
decode worker is lost mid-stream, the request resumes elsewhere by re-prefill of its prompt and
the tokens so far (`resume`). However it ends (finished, aborted, failed, deadline, client
gone), both workers forget it and free its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from tandem.cluster.admission import AdmissionQueue
from tandem.cluster.errors import (
    HandoffFailed,
    InvalidRequest,
    WorkerUnavailable,
    translate,
)
from tandem.cluster.kv_index import KVIndex
from tandem.cluster.migration import Migrator
from tandem.cluster.offload_placement import OffloadPlacer
from tandem.cluster.relay import TokenRelay
from tandem.cluster.routed import Placement, PrefillLost, RequestMoving, RoutedRequest, WorkerLost
from tandem.cluster.routing_policy import decode_order, pick_prefill
from tandem.decode_worker.worker import TokenDelta
from tandem.engine.errors import OutOfBlocksError
from tandem.engine.sampler import TokenLogprobs
from tandem.prefill_worker.worker import PrefillResult
from tandem.transfer import TransportNotUsable, choose_receiver, log_fallback
from tandem.transfer.base import ReceiverInfo
from tandem.worker_base import OffloadConfig, WorkerInfo

logger = logging.getLogger(__name__)



@dataclass
class Router(Migrator, OffloadPlacer, TokenRelay):
    prefill_workers: list[Any]
    decode_workers: list[Any]  # colocated workers in colocated mode
    kv_receivers: list[tuple[ReceiverInfo, ...]]  # how to reach each decode worker
    kv_transports: list[tuple[str, ...]]  # what each prefill worker can send with
    colocated: bool
    max_queued_requests: int
    call_timeout_s: float
    kv_index: KVIndex | None = None
    max_resumes: int = 2  # per request: re-placements after its decode worker was lost
    handoff_timeout_s: float = 30.0  # a live migration's KV transfer
    num_resumed: int = 0
    block_size: int = 16  # the decode workers' KV blocks, in tokens
    migrations: Counter[str] = field(default_factory=Counter)  # transport -> requests moved
    lost_prefill: set[int] = field(default_factory=set)  # prefill workers seen dead
    draining: set[int] = field(default_factory=set)  # decode slots that take no new request
    queued_prompt_tokens: dict[int, int] = field(default_factory=dict)  # prefill index -> tokens
    attention_workers: list[Any] = field(default_factory=list)  # attention offload's holders
    attention_infos: list[WorkerInfo | None] = field(default_factory=list)  # None: not serving
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    attention_draining: set[int] = field(default_factory=set)  # attention slots not serving
    num_offloaded: int = 0
    num_capacity_waits: int = 0  # times a request found no worker with room and waited
    active: dict[str, Placement] = field(default_factory=dict)
    _cleanups: set[asyncio.Task] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.admission = AdmissionQueue(self.max_queued_requests)

    @property
    def num_queued(self) -> int:
        return len(self.admission)

    async def generate(self, req: RoutedRequest) -> AsyncIterator[TokenDelta]:
        """Run `req` and yield its token deltas; the last one has a finish_reason. If its
        decode worker is lost mid-stream, the request resumes elsewhere (`resume`)."""
        if req.request_id in self.active:
            raise InvalidRequest(f"request_id: {req.request_id!r} is already running")
        placed = self.active[req.request_id] = Placement(worker_id=req.worker_id)
        finished, generated, current, resumes = False, [], req, 0
        try:
            await self._place(req, placed)
            while not placed.aborted:  # aborted while it waited for blocks, or while it moved
                placed.origin, placed.generated = req, generated  # what a move reads
                try:
                    async for delta in self._relay(current, placed):
                        finished = delta.finish_reason is not None
                        generated.extend(delta.token_ids)
                        if current is not req and finished:  # the text spans two workers
                            delta = replace(delta, text=None)
                        yield delta
                    return
                except RequestMoving:  # moves are not failures: they do not use up resumes
                    current, placed = await self.migrate(req, generated, placed)
                except WorkerLost as e:
                    if placed.aborted or resumes == self.max_resumes:
                        raise
                    resumes += 1
                    if isinstance(e, PrefillLost) and e.index is not None:
                        self.lost_prefill.add(e.index)
                    current, placed = await self.resume(req, generated, placed, e)
            yield TokenDelta([], "abort")  # `finally` frees its blocks if it has any
        finally:
            self.active.pop(req.request_id, None)
            if placed.decode is not None and not finished:
                self._clean_up_later(placed)
            if placed.move_target is not None:  # a move it did not live to make
                self._clean_up_later(placed.move_target.placed)
            self.admission.capacity_changed()  # its blocks are (being) freed

    async def resume(self, req: RoutedRequest, generated: list[int], lost: Placement,
                     error: Exception) -> tuple[RoutedRequest, Placement]:
        """Continue `req` on other workers after one of its workers was lost: prefill the
        prompt plus the tokens generated so far (its cached prefix is reused), then decode the
        rest. The client's stream goes on with no token lost or repeated."""
        self.num_resumed += 1
        logger.warning("request %s: %s after %d tokens; resuming it elsewhere",
                       req.request_id, error, len(generated))
        self._clean_up_later(lost)
        resumed = replace(req, prompt_token_ids=[*req.prompt_token_ids, *generated],
                          params=req.params.after(len(generated)),
                          segments=None if generated else req.segments,
                          worker_id=uuid.uuid4().hex, prefill=None, prefill_worker=None)
        placed = self.active[req.request_id] = Placement(worker_id=resumed.worker_id)
        await self._place(resumed, placed)
        return resumed, placed

    async def abort(self, request_id: str) -> bool:
        placed = self.active.get(request_id)
        if placed is None:
            return False
        placed.aborted = True
        AdmissionQueue.release(placed.turn)  # a waiting request leaves the queue now
        if placed.decode is not None:
            await self._abort_on_workers(placed)
        return True

    # -- placement -----------------------------------------------------------------------------

    async def _place(self, req: RoutedRequest, placed: Placement) -> None:
        started = time.perf_counter()
        try:
            async with self.admission.turn() as turn:  # FIFO: only the head asks for blocks
                placed.turn = turn
                await turn
                decode, block_ids = await self._reserve(req, placed)
        finally:
            req.queue_s = time.perf_counter() - started
        if decode is not None:
            placed.decode, placed.decode_slot = self.decode_workers[decode], decode
        if not self.colocated and not placed.aborted and placed.ranges:
            index = placed.prefill_index = self._pick_prefill(req)
            placed.prefill = self.prefill_workers[index]
            placed.prefill_task = asyncio.ensure_future(
                self._prefill_offloaded(index, req, placed))
            placed.prefill_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        elif not self.colocated and not placed.aborted:
            index = placed.prefill_index = self._pick_prefill(req)
            try:
                receiver, reason = choose_receiver(self.kv_transports[index],
                                                   self.kv_receivers[decode])
            except TransportNotUsable as e:
                raise HandoffFailed(str(e)) from None
            if reason:
                log_fallback(reason)
            placed.prefill, placed.transport = self.prefill_workers[index], receiver.transport
            placed.prefill_task = asyncio.ensure_future(
                self._prefill(index, req, receiver, block_ids))
            # Its error is read in _relay; an aborted request's failed prefill is expected.
            placed.prefill_task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _reserve(self, req: RoutedRequest, placed: Placement) \
            -> tuple[int | None, list[int]]:
        """Index of a decode worker holding blocks for `req` (or running it, when colocated)
        and the blocks; (None, []) if the request was aborted while it waited."""
        while not placed.aborted:
            seen = self.admission.generation
            wanted = False if self.colocated else self.offload_wanted(req)
            order = await self._decode_order()
            for i in order if wanted is not True else ():
                worker = self.decode_workers[i]
                method = worker.generate if self.colocated else worker.reserve
                # Set before the call: if we stop waiting (deadline, disconnect), the call may
                # still succeed remotely, and the clean-up must know where to abort.
                placed.decode = worker
                try:
                    # Under offload auto, a decode worker takes it only if it can finish there.
                    more = {"whole": True} if wanted is None else {}
                    blocks = await self._call(method.remote(
                        req.worker_id, req.prompt_token_ids, req.params, **more),
                        keep=OutOfBlocksError)
                    return i, blocks or []
                except OutOfBlocksError:
                    placed.decode = None
            if wanted is not False and await self.reserve_ranges(req, placed):
                placed.decode = self.decode_workers[order[0]]  # it holds no block for it
                await self._call(placed.decode.expect_offloaded.remote(req.worker_id))
                return order[0], []
            self.num_capacity_waits += 1
            await self.admission.wait_for_capacity(seen)  # a request ends, or a re-check
        return None, []

    async def _decode_order(self) -> list[int]:
        """Decode workers by most free KV blocks, then smallest batch; unreachable and
        draining ones left out (UNAVAILABLE when none answers)."""
        async def ask(slot: int, worker: Any) -> Any:
            if slot in self.draining:  # counted as not answering: it takes nothing new
                return WorkerUnavailable(f"decode slot {slot} is draining")
            return await self._call(worker.stats.remote())

        stats = await asyncio.gather(*(ask(i, w) for i, w in enumerate(self.decode_workers)),
                                     return_exceptions=True)
        return decode_order(stats)

    def _pick_prefill(self, req: RoutedRequest) -> int:
        return pick_prefill(req, len(self.prefill_workers), self.queued_prompt_tokens,
                            self.kv_index, self.lost_prefill)

    async def _prefill(self, index: int, req: RoutedRequest, receiver: ReceiverInfo,
                       block_ids: list[int]) -> PrefillResult:
        n = len(req.prompt_token_ids)
        self.queued_prompt_tokens[index] = self.queued_prompt_tokens.get(index, 0) + n
        try:
            # No call timeout: a long prompt may queue; the request's deadline bounds this.
            req.prefill = await self.prefill_workers[index].prefill.remote(
                req.worker_id, req.prompt_token_ids, req.params, receiver, block_ids,
                req.segments)
            req.num_cached_tokens = req.prefill.num_cached_tokens
            req.num_recomputed_tokens = req.prefill.num_recomputed_tokens
            return req.prefill
        finally:
            self.queued_prompt_tokens[index] -= n

    async def prompt_logprobs(self, token_ids: list[int], top_n: int, timeout_s: float) \
            -> list[TokenLogprobs]:
        """Logprobs of a prompt's tokens, scored by a prefill (or colocated) worker."""
        workers = self.prefill_workers or self.decode_workers
        index = min(range(len(workers)), key=lambda i: self.queued_prompt_tokens.get(i, 0)) \
            if self.prefill_workers else 0
        try:
            return await asyncio.wait_for(
                workers[index].prompt_logprobs.remote(token_ids, top_n), timeout_s)
        except Exception as e:
            raise translate(e) from None

    # -- plumbing ------------------------------------------------------------------------------

    async def _call(self, ref: Any, keep: type[Exception] | None = None) -> Any:
        """Await a worker call with the control-call deadline; errors become cluster errors
        (except those of type `keep`, which the caller handles)."""
        try:
            return await asyncio.wait_for(ref, self.call_timeout_s)
        except Exception as e:
            if keep is not None and isinstance(e, keep):
                raise
            raise translate(e) from None

    async def _abort_on_workers(self, placed: Placement) -> None:
        calls = []
        if placed.decode is not None:  # it keeps blocks a sender may still write into
            calls.append(placed.decode.abort.remote(placed.worker_id, placed.transport))
        if placed.prefill is not None:
            calls.append(placed.prefill.abort.remote(placed.worker_id))
        for holder in placed.attention:  # its KV ranges, reserved or held
            calls.append(holder.abort.remote(placed.worker_id, placed.transport))
        results = await asyncio.gather(
            *(asyncio.wait_for(call, self.call_timeout_s) for call in calls),
            return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                logger.warning("request %s: abort on a worker failed: %r", placed.worker_id,
                               result)

    def _clean_up_later(self, placed: Placement) -> None:
        """Abort on both workers in the background: the caller may be being cancelled."""
        if placed.prefill_task is not None and not placed.prefill_task.done():
            placed.prefill_task.cancel()
        task = asyncio.get_running_loop().create_task(self._abort_on_workers(placed))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        task.add_done_callback(lambda _: self.admission.capacity_changed())

    async def drain(self) -> None:
        """Wait for background clean-ups (at shutdown)."""
        if self.kv_index is not None:
            await self.kv_index.stop()
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
