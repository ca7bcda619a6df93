"""`AttentionWorker`: holds offloaded KV by token range and answers decode attention over it.

It loads no weights: only the model's shape (for the KV layout) and its fingerprint (KV from
any other model is refused). Its life per sequence range:
    reserved (`reserve`: blocks for [first_token, first_token + n)) -> receiving (a prefill
    worker streams that range's KV layer by layer over NIXL or gRPC, with the usual checks) ->
    held (the decode worker attends over it through the attention channel, and appends each
    new token's k/v when this is the sequence's tail) -> freed (`FREE` on the channel, or
    `abort` from the router).
Decode workers talk to it per layer over the attention channel (`channel_server.py`), never
through Ray; Ray carries only control calls (reserve, abort, stats).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass, replace

import torch

from tandem.attention_worker.channel_server import ChannelCounters, ChannelServer
from tandem.attention_worker.range_kv import RangeKV
from tandem.engine.host_memory import keep_freed_memory
from tandem.engine.kv_cache import KVSpec
from tandem.engine.loader import load_tokenizer, model_fingerprint, resolve_model_path
from tandem.engine.outputs import EngineStats
from tandem.engine.sizing import CPU_KV_CACHE_GB, max_model_len
from tandem.log import setup_logging
from tandem.transfer import TransportNotUsable, available_transports, make_transport
from tandem.transfer.base import Handoff, KVIdentity, KVSink, KVTransport
from tandem.transfer.errors import TransferRejected
from tandem.worker_base import WorkerConfig, WorkerInfo, WorkerStats, node_ip, own_actor
from tandem.worker_signals import drain_on_sigterm

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionStats:
    num_sequences: int  # sequences with a range held (or reserved) here
    held_bytes: int  # KV bytes of the tokens held
    channel: ChannelCounters  # bytes each way, requests served


class AttentionWorker(KVSink):
    role = "attention"

    def __init__(self, config: WorkerConfig, model_id: str, **_: object) -> None:
        self.config, self.model_id = config, model_id
        self.kv: RangeKV | None = None
        self.lock = threading.Lock()  # the channel's threads and this actor's calls
        self.channel: ChannelServer | None = None
        self.transports: list[KVTransport] = []
        self.kv_receivers: tuple = ()
        self._reserved: dict[str, int] = {}  # request -> tokens its range's KV must cover
        self.info_: WorkerInfo | None = None
        self.drain_requested = False

    async def start(self) -> WorkerInfo:
        setup_logging()
        drain_on_sigterm(self._request_drain)
        torch.set_num_threads(self.config.engine.num_threads or 1)
        keep_freed_memory()  # each layer's gathered KV reuses the same pages
        engine = self.config.engine
        path = resolve_model_path(engine.model)
        _, model = await asyncio.to_thread(load_tokenizer, engine.model)
        fingerprint = await asyncio.to_thread(model_fingerprint, path, model)
        spec = KVSpec(num_layers=model.num_layers, num_kv_heads=model.num_kv_heads,
                      head_dim=model.head_dim, dtype=engine.dtype, block_size=engine.block_size)
        device = "cuda" if engine.device == "cuda" or (
            engine.device == "auto" and torch.cuda.is_available()) else "cpu"
        self.kv = RangeKV(spec, self._num_blocks(spec), device)
        host = self.config.host or node_ip()
        self.channel = ChannelServer(self.kv, self.lock, host)
        limit = max_model_len(model, engine)
        identity = KVIdentity(fingerprint, spec, limit)
        names = available_transports(self.config.kv_transport, self.config.tls is not None)
        for name in names:
            transport = make_transport(name, tls=self.config.tls, host=host)
            self.transports.append(transport)
            receiver = await transport.start_receiver(host, identity, self.kv.cache, self)
            self.kv_receivers = (*self.kv_receivers, replace(receiver, control=own_actor()))
        self.info_ = WorkerInfo(self.role, self.model_id, fingerprint, limit, spec,
                                self.kv_receivers, (), node_ip(), os.environ.get("POD_NAME", ""),
                                os.getpid(), tuple(t.peer_id for t in self.transports
                                                   if t.peer_id), self.channel.address)
        logger.info("attention worker ready: %d KV blocks of %d tokens (%.2f GiB), channel %s",
                    self.kv.cache.num_blocks, spec.block_size,
                    self.kv.cache.num_blocks * spec.bytes_per_block / 2**30, self.channel.address)
        return self.info_

    def _num_blocks(self, spec: KVSpec) -> int:
        if self.config.offload.attention_kv_blocks:
            return self.config.offload.attention_kv_blocks
        engine = self.config.engine
        if engine.num_kv_blocks:
            return engine.num_kv_blocks
        gb = engine.kv_cache_gb if engine.kv_cache_gb is not None else CPU_KV_CACHE_GB
        return max(1, int(gb * 2**30) // spec.bytes_per_block)

    def _request_drain(self) -> None:
        self.drain_requested = True

    @property
    def _kv(self) -> RangeKV:
        if self.kv is None:
            raise RuntimeError("attention worker used before start()")
        return self.kv

    # -- control (Ray) -------------------------------------------------------------------------

    async def reserve(self, request_id: str, first_token: int, num_tokens: int,
                      room: int = 0) -> list[int]:
        """Hold blocks for tokens [first_token, first_token + num_tokens) of a sequence, whose
        KV a prefill worker sends next, and for `room` more tokens it may grow by here (the
        tail); the blocks of the range, in order (OutOfBlocksError when short)."""
        if num_tokens <= 0:
            raise ValueError(f"num_tokens: {num_tokens}; a range holds at least one token")
        with self.lock:
            kv = self._kv
            kv.open(request_id, first_token)
            try:
                kv.grow(request_id, num_tokens)
                if room:
                    kv.reserve_room(request_id, room)
            except BaseException:
                kv.free(request_id)
                raise
            blocks = kv.ranges[request_id].blocks[:kv.spec.num_blocks_for(num_tokens)]
        for transport in self.transports:
            transport.reserved(request_id)
        self._reserved[request_id] = num_tokens
        return blocks

    async def admit_kv_sender(self, transport: str, introduction: bytes) -> None:
        """A prefill worker introduces itself (through Ray) before it sends KV."""
        for t in self.transports:
            if t.name == transport:
                t.admit(introduction)
                return
        raise TransportNotUsable(f"this attention worker receives no KV over {transport}")

    async def abort(self, request_id: str, *transports: str | None) -> bool:
        """Free a sequence's range; while a sender may still write into it (a reservation),
        the blocks stay held until its transports settle."""
        if self._reserved.pop(request_id, None) is not None and any(transports):
            await asyncio.gather(*(t.settled(request_id, self.config.handoff_timeout_s)
                                   for t in self.transports if t.name in transports))
        with self.lock:
            held = request_id in self._kv.ranges
            self._kv.free(request_id)
        return held

    async def stats(self) -> WorkerStats:
        kv = self._kv
        with self.lock:
            num_free, held = kv.num_free_blocks, kv.held_bytes
            num_seqs = len(kv.ranges)
        engine = EngineStats(num_waiting=0, num_running=num_seqs, num_prefilled=0,
                             num_reserved=len(self._reserved), num_blocks=kv.cache.num_blocks,
                             num_free_blocks=num_free, num_prefix_hit_blocks=0,
                             num_preemptions=0)
        counters = replace(self.channel.counters) if self.channel else ChannelCounters()
        return WorkerStats(engine, num_seqs, drain_requested=self.drain_requested,
                           attention=AttentionStats(num_seqs, held, counters))

    async def forget_kv_peers(self, peer_ids: list[str]) -> None:
        for transport in self.transports:
            transport.forget_peers(set(peer_ids))

    async def known_kv_peers(self) -> list[str]:
        return sorted({p for t in self.transports for p in t.known_peers()})

    async def shutdown(self) -> None:
        if self.channel is not None:
            self.channel.close()
        for transport in self.transports:
            await transport.close()

    # -- the transports' sink ------------------------------------------------------------------

    def blocks_of(self, request_id: str) -> list[int] | None:
        if request_id not in self._reserved:
            return None
        held = self._kv.ranges.get(request_id)
        if held is None:
            return None
        return held.blocks[:self._kv.spec.num_blocks_for(self._reserved[request_id])]

    def expecting(self) -> bool:
        return bool(self._reserved)

    async def complete(self, handoff: Handoff, num_tokens: int) -> None:
        """A range's KV arrived whole and checked: it is held, ready for attention."""
        wanted = self._reserved.get(handoff.request_id)
        if wanted is None:
            raise TransferRejected(f"request {handoff.request_id}: no range is reserved for it")
        if num_tokens != wanted:
            raise TransferRejected(f"request {handoff.request_id}: KV of {num_tokens} tokens "
                                   f"for a range of {wanted}")
        del self._reserved[handoff.request_id]
