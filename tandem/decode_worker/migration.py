"""`MigrationSource`: the decode worker's side of live migration (Llumnix), as the source.

The router moves a running request to another decode worker in two stages:
1. pre-copy, while it keeps decoding here: the target reserves blocks for the tokens of the
   request's full blocks, and `precopy` sends their KV (full blocks never change again);
2. stop and copy: `suspend` takes it out of the batch, keeping its blocks (the open poll
   returns its last tokens, then a "migrated" delta); the target extends its reservation to
   every token but the last (whose KV is not computed yet), and `send_request` sends the KV of
   the blocks the pre-copy did not carry. The target then adopts the request with its last
   token as the first one it holds, and the blocks here are freed.
Only stage 2 stalls the stream. Both stages go over the usual transport with its checks; a
pre-copy whose source blocks were freed since (a preemption) is refused in stage 2. Tokens,
params and output position travel through the router (the target's request is the prompt plus
all output tokens but the last, with `SamplingParams.after`); the sampler is counter-based, so
no RNG state moves, and nothing is pickled outside Ray's own calls.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tandem.engine.errors import EngineError
from tandem.engine.handoff import RequestKV
from tandem.transfer import TransportNotUsable
from tandem.transfer.base import Handoff, KVTarget, KVTransport, ReceiverInfo, SendSession
from tandem.transfer.errors import TransferRejected
from tandem.transfer.introductions import Introductions

logger = logging.getLogger(__name__)

MIGRATED = "migrated"  # the finish_reason of the poll's last delta after `suspend`


@dataclass(frozen=True)
class MigrationResult:
    transport: str
    num_tokens: int  # of KV the request holds on the target
    bytes: int  # uncompressed KV bytes this stage moved
    seconds: float  # from the first piece posted to the target's answer


class MigrationSource:
    """Mixin of DecodeWorker, which provides the engine, transports, streams and leases."""

    transports: list[KVTransport]

    def _init_migration(self) -> None:
        self._suspended: dict[str, RequestKV] = {}
        self._sending: dict[str, SendSession] = {}
        self._precopied: dict[str, tuple[int, int]] = {}  # request -> (table epoch, blocks)
        self.introductions = Introductions({t.name: t for t in self.transports},
                                           self.config.handoff_timeout_s)

    async def precopy(self, request_id: str, receiver: ReceiverInfo, block_ids: list[int],
                      target_request_id: str, num_blocks: int) -> MigrationResult:
        """Stage 1: send the KV of a running request's first `num_blocks` (full) blocks into
        `block_ids` of the decode worker at `receiver`, while the request goes on here."""
        self.calls["precopy"] += 1
        kv = await self._engine.call(lambda e: e.request_kv(request_id))
        bs = self._engine.engine.kv_spec.block_size
        if kv.num_kv_tokens < num_blocks * bs:
            raise EngineError(f"request {request_id} has KV for {kv.num_kv_tokens} tokens, "
                              f"not {num_blocks} full blocks")
        result = await self._send(request_id, kv, receiver, block_ids, target_request_id,
                                  range(num_blocks), num_blocks * bs, [])
        self._precopied[request_id] = (kv.block_table_epoch, num_blocks)
        return result

    async def suspend(self, request_id: str) -> RequestKV:
        """Take a decoding request out of the batch to move it (raises EngineError when it
        cannot move: not yet adopted, or preempted). Its poll then ends with a MIGRATED
        delta, after every token it generated here."""
        self.calls["suspend"] += 1
        if request_id not in self._num_sent:
            raise EngineError(f"unknown request {request_id!r} on this decode worker")
        suspended = await self._engine.call(lambda e: e.suspend(request_id))
        self._suspended[request_id] = suspended
        # Not polled any more: the lease now covers the send, which has its own deadline.
        self._leases[request_id] = time.monotonic() + self.config.lease_s \
            + self.config.handoff_timeout_s
        self._engine.publish(MIGRATED, request_id)  # after its outputs, already published
        return suspended

    async def send_request(self, request_id: str, receiver: ReceiverInfo,
                           block_ids: list[int], target_request_id: str,
                           first_block: int = 0) -> MigrationResult:
        """Stage 2: send a suspended request's KV from block `first_block` on (the pre-copy
        carried the ones before) into `block_ids` of the decode worker at `receiver`, which
        adopts it as `target_request_id`; then free it here, sent or not."""
        suspended = self._suspended.get(request_id)
        try:
            if suspended is None:
                raise EngineError(f"request {request_id!r} is not suspended on this worker")
            if first_block and self._precopied.get(request_id) != \
                    (suspended.block_table_epoch, first_block):
                raise TransferRejected(f"request {request_id}: its blocks changed since the "
                                       "pre-copy (preempted): move it in one piece")
            n = suspended.num_kv_tokens
            blocks = range(first_block, self._engine.engine.kv_spec.num_blocks_for(n))
            return await self._send(request_id, suspended, receiver, block_ids,
                                    target_request_id, blocks, n, suspended.token_ids[-1:])
        finally:
            self._suspended.pop(request_id, None)
            await self._engine.call(lambda e: e.abort(request_id))  # frees the blocks
            self.forget(request_id)

    async def _send(self, request_id: str, kv: RequestKV, receiver: ReceiverInfo,
                    block_ids: list[int], target_request_id: str, blocks: range,
                    num_tokens: int, output_token_ids: list[int]) -> MigrationResult:
        engine = self._engine.engine
        transport = next((t for t in self.transports if t.name == receiver.transport), None)
        if transport is None:
            raise TransportNotUsable(f"this decode worker cannot send KV over "
                                     f"{receiver.transport}")
        await self.introductions.ensure(receiver)
        started = time.perf_counter()
        session = self._sending[request_id] = transport.open_session(
            engine.cache, engine.fingerprint, KVTarget(receiver, tuple(block_ids), num_tokens),
            target_request_id)
        try:
            if len(blocks):
                session.post(range(engine.kv_spec.num_layers), blocks.start,
                             kv.block_ids[blocks.start:blocks.stop])
            await session.finish(Handoff(target_request_id, output_token_ids, kv.exact_tokens),
                                 timeout=self.config.handoff_timeout_s)
        except BaseException:
            await session.abort()  # no WRITE may read the blocks once they are freed
            raise
        finally:
            self._sending.pop(request_id, None)
        stage = "migration" if output_token_ids else "precopy"
        self.handoffs[f"{receiver.transport}/{stage}"] += 1
        return MigrationResult(receiver.transport, num_tokens,
                               len(blocks) * engine.kv_spec.bytes_per_block,
                               time.perf_counter() - started)

    async def _stop_sending(self, request_id: str) -> None:
        """Before an abort frees a request's blocks: stop a migration reading them."""
        self._precopied.pop(request_id, None)
        session = self._sending.get(request_id)
        if session is not None:
            await session.abort()
