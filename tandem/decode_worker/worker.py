"""`DecodeWorker`: continue requests prefilled elsewhere in one continuous batch.

A request's lifecycle here, as queues:
    reserved (blocks held for the prompt) -> receiving (the prefill worker writes the KV into
    those blocks, piece by piece, and the transport checks each piece) -> running (adopted
    into the batch with the prefill worker's first token once every piece checked out) ->
    finished (blocks freed).
A running request can also move to another decode worker, KV and all (`migration.py`):
    running -> suspended (out of the batch, blocks held) -> sent -> freed here.
A reserved request that is aborted keeps its blocks until no sender can still write into them
(`KVTransport.settled`).
The gateway long-polls `poll` for token deltas; the first delta carries the first token, so the
client sees one stream. A colocated worker also takes whole requests (`generate`) and runs
both phases itself: the baseline that disaggregation is measured against.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace

from tandem.decode_worker.migration import MIGRATED, MigrationSource
from tandem.decode_worker.offload import OffloadedDecoding
from tandem.engine.config import EngineConfig
from tandem.engine.errors import EngineError
from tandem.engine.loader import LoadedModel
from tandem.engine.outputs import RequestOutput
from tandem.engine.sampler import TokenLogprobs
from tandem.engine.sampling_params import SamplingParams
from tandem.transfer import TransportNotUsable, available_transports, make_transport
from tandem.transfer.base import Handoff, KVIdentity, KVSink, KVTransport
from tandem.transfer.errors import TransferRejected
from tandem.worker_base import EngineWorker, WorkerConfig, WorkerInfo, node_ip, own_actor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reservation:
    block_ids: list[int]
    num_tokens: int  # the prompt's: the KV must cover exactly these
    migrating: bool = False  # a request moving here from another decode worker
    in_place: int = 0  # leading blocks whose KV a migration's pre-copy already wrote


@dataclass(frozen=True)
class TokenDelta:
    token_ids: list[int]  # tokens generated since the previous delta
    finish_reason: str | None = None
    text: str | None = None  # the engine's final text (cut at a stop string), when finished
    num_cached_tokens: int = 0
    # One per token when the request asked for logprobs; None for a token this worker did not
    # sample (the prefill worker's first token: the router fills it in).
    logprobs: list[TokenLogprobs | None] | None = None


class DecodeWorker(MigrationSource, OffloadedDecoding, EngineWorker, KVSink):
    role = "decode"

    def __init__(self, config: WorkerConfig, model_id: str, receives_kv: bool = True,
                 loaded: LoadedModel | None = None) -> None:
        super().__init__(config, model_id, loaded)
        self.receives_kv = receives_kv  # False for colocated workers: no KV receivers
        self.transports: list[KVTransport] = []
        self._num_sent: dict[str, int] = {}  # request -> output tokens already polled
        self._reserved: dict[str, Reservation] = {}  # requests whose KV may be landing
        self._leases: dict[str, float] = {}  # request -> monotonic time its lease ends
        self._sweeper: asyncio.Task | None = None
        self.num_expired = 0  # requests freed because their lease ran out

    def engine_config(self) -> EngineConfig:
        blocks = self.config.offload.decode_kv_blocks
        engine = self.config.engine
        return engine.model_copy(update={"num_kv_blocks": blocks}) if blocks else engine

    async def start(self) -> WorkerInfo:
        names = available_transports(self.config.kv_transport, self.config.tls is not None) \
            if self.receives_kv else ()
        await super().start()
        e = self._engine.engine
        identity = KVIdentity(e.fingerprint, e.kv_spec, e.max_model_len)
        host = self.config.host or node_ip()
        for name in names:
            transport = make_transport(name, tls=self.config.tls, host=host)
            self.transports.append(transport)
            receiver = await transport.start_receiver(host, identity, e.cache, self)
            # Senders introduce themselves through this handle (Ray), never over the transport.
            self.kv_receivers = (*self.kv_receivers, replace(receiver, control=own_actor()))
        self._init_migration()  # its transports also send, to move requests to peers
        self._init_offload()
        self._sweeper = asyncio.get_running_loop().create_task(self._expire_leases())
        return self.info()

    async def _expire_leases(self) -> None:
        """Free what a gateway that stopped polling (it died, or lost this worker) left here."""
        lease = self.config.lease_s
        while True:
            await asyncio.sleep(min(lease / 4, 5.0))
            now = time.monotonic()
            expired = [r for r, end in self._leases.items() if end < now]
            for request_id in expired:
                self._leases.pop(request_id, None)
                self.num_expired += 1
                logger.warning("request %s: not polled for %.0f s (lease expired); freeing "
                               "its blocks", request_id, lease)
            # A sender may still be writing: each waits (in parallel) for every transport to
            # settle, at most handoff_timeout_s.
            results = await asyncio.gather(
                *(self.abort(r, *(t.name for t in self.transports)) for r in expired),
                return_exceptions=True)
            for request_id, result in zip(expired, results, strict=True):
                if isinstance(result, BaseException):  # the sweeping goes on regardless
                    logger.error("request %s: freeing after the lease failed: %r", request_id,
                                 result)

    async def admit_kv_sender(self, transport: str, introduction: bytes) -> None:
        """A prefill worker introduces itself before it sends KV with `transport` (NIXL: its
        agent metadata). Called through Ray, the control path, which is what makes it trusted:
        the transport takes no such introduction from its own traffic."""
        for t in self.transports:
            if t.name == transport:
                t.admit(introduction)
                return
        raise TransportNotUsable(f"this decode worker receives no KV over {transport} (it has "
                                 f"{', '.join(t.name for t in self.transports) or 'none'})")

    async def reserve(self, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams, num_sent: int = 0, whole: bool = False) \
            -> list[int]:
        """Hold blocks for a prompt and return their ids, in order; raises OutOfBlocksError
        when too few are free. `num_sent`: output tokens the client has already (1 for a
        request migrated here: the last token sampled before it moved)."""
        self.calls["reserve"] += 1
        blocks = await self._open(
            request_id, lambda e: e.reserve(request_id, prompt_token_ids, params, whole))
        for transport in self.transports:
            transport.reserved(request_id)
        self._reserved[request_id] = Reservation(blocks, len(prompt_token_ids),
                                                 migrating=num_sent > 0)
        self._num_sent[request_id] = num_sent
        return blocks

    async def extend(self, request_id: str, token_ids: list[int],
                     params: SamplingParams) -> list[int]:
        """A migrating request's second stage: its reservation grows to `token_ids` more
        tokens (those after its pre-copied blocks), with the params it continues under; the
        blocks, in order (raises OutOfBlocksError when too few are free)."""
        reservation = self._reserved.get(request_id)
        if reservation is None or not reservation.migrating:
            raise EngineError(f"request {request_id!r} is not migrating to this worker")
        blocks = await self._engine.call(
            lambda e: e.extend_reserved(request_id, token_ids, params))
        for transport in self.transports:  # the pre-copy's transfer is over; a new one comes
            transport.reserved(request_id)
        self._reserved[request_id] = replace(
            reservation, block_ids=blocks, num_tokens=reservation.num_tokens + len(token_ids))
        self._leases[request_id] = time.monotonic() + self.config.lease_s
        return blocks

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> None:
        """Colocated mode: prefill and decode here."""
        await self._open(request_id, lambda e: e.add_request(request_id, prompt_token_ids, params))

    async def _open(self, request_id: str, submit):
        self._engine.open_stream(request_id)
        self._num_sent[request_id] = 0
        self._leases[request_id] = time.monotonic() + self.config.lease_s
        try:
            return await self._engine.call(submit)
        except BaseException:
            self.forget(request_id)
            raise

    # -- the transports' sink ------------------------------------------------------------------

    def blocks_of(self, request_id: str) -> list[int] | None:
        reservation = self._reserved.get(request_id)
        return reservation.block_ids if reservation else None

    def expecting(self) -> bool:
        return bool(self._reserved)

    def kv_in_place(self, request_id: str) -> int:
        reservation = self._reserved.get(request_id)
        return reservation.in_place if reservation else 0

    async def complete(self, handoff: Handoff, num_tokens: int) -> None:
        """Every piece of the KV is in the reserved blocks and checked: start decoding."""
        request_id = handoff.request_id
        reservation = self._reserved.get(request_id)
        if reservation is None:
            raise TransferRejected(f"request {request_id}: no KV blocks are reserved for it")
        if num_tokens != reservation.num_tokens:
            raise TransferRejected(f"request {request_id}: KV of {num_tokens} tokens for a "
                                   f"prompt of {reservation.num_tokens}")
        if not handoff.output_token_ids:  # a migration's pre-copy: its first blocks' KV
            block_size = self._engine.engine.kv_spec.block_size
            if not reservation.migrating or num_tokens % block_size:
                raise TransferRejected(f"request {request_id}: KV without tokens is only "
                                       "taken as a migrating request's full blocks")
            self._reserved[request_id] = replace(reservation,
                                                 in_place=num_tokens // block_size)
            return
        del self._reserved[request_id]
        try:
            await self._engine.call(lambda e: e.adopt(request_id, None, handoff.output_token_ids,
                                                      handoff.exact_tokens),
                                    publish_to=request_id)
        except EngineError as e:
            raise TransferRejected(str(e)) from None

    async def abort(self, request_id: str, *transports: str | None) -> bool:
        """Stop a request and free its blocks. `transports` name those a prefill worker was
        told to send its KV with, if any: while they may still write into the blocks, those
        stay held (up to `handoff_timeout_s`)."""
        await self._stop_sending(request_id)  # a migration reading its blocks
        if self._reserved.pop(request_id, None) is not None and any(transports):
            await asyncio.gather(*(t.settled(request_id, self.config.handoff_timeout_s)
                                   for t in self.transports if t.name in transports))
        aborted = await super().abort(request_id)
        self._reserved.pop(request_id, None)  # a reserve() that raced this abort
        return aborted

    async def poll(self, request_id: str, timeout_s: float) -> list[TokenDelta]:
        """New tokens of a request, waiting up to `timeout_s` for the first; [] on timeout."""
        if request_id not in self._num_sent:
            raise EngineError(f"unknown request {request_id!r} on this decode worker")
        self._leases[request_id] = time.monotonic() + self.config.lease_s  # renewed
        stream = self._engine.stream_of(request_id)
        try:
            items = [await asyncio.wait_for(stream.get(), timeout_s)]
        except TimeoutError:
            return []
        while not stream.empty():
            items.append(stream.get_nowait())
        if request_id not in self._num_sent:  # aborted while this poll waited: what it sent
            return [TokenDelta([], "abort")]  # is no longer known, so send nothing more
        deltas = []
        for item in items:
            if isinstance(item, BaseException):
                self.forget(request_id)
                raise item
            if item is MIGRATED:  # suspended to move: no more tokens from here
                deltas.append(TokenDelta([], MIGRATED))
                break
            deltas.append(self._delta(item))
            if item.finished:
                self.forget(request_id)
                break
        return deltas

    def _delta(self, output: RequestOutput) -> TokenDelta:
        sent = self._num_sent.get(output.request_id, 0)
        self._num_sent[output.request_id] = len(output.token_ids)
        logprobs = None
        if output.logprobs is not None:
            # Tokens handed over by the prefill worker come first and have no entry here.
            handed = len(output.token_ids) - len(output.logprobs)
            padded: list[TokenLogprobs | None] = [None] * handed
            logprobs = [*padded, *output.logprobs][sent:]
        return TokenDelta(output.token_ids[sent:], output.finish_reason,
                          output.text if output.finished else None, output.num_cached_tokens,
                          logprobs)

    def forget(self, request_id: str) -> None:
        super().forget(request_id)
        self._precopied.pop(request_id, None)
        self._num_sent.pop(request_id, None)
        self._leases.pop(request_id, None)

    def num_open_requests(self) -> int:
        return len(self._num_sent)

    def kv_transport_objects(self) -> list[KVTransport]:
        return self.transports

    async def shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for transport in self.transports:
            await transport.close()
        self._close_channels()
        await super().shutdown()
