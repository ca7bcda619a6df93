"""KV handoff with NIXL: one-sided WRITEs from the prefill worker's blocks straight into the
blocks the decode worker reserved, over UCX (RDMA on a GPU cluster, shared memory or loopback
here).

Control messages are NIXL notifications, one byte of kind then JSON (never pickle):
    H  sender -> receiver  the sender's agent metadata, once per peer, so the receiver can answer
    P  with each WRITE     a piece landed: request, token count, layers, blocks, checksum
    E  sender -> receiver  every WRITE is done: the KV header and the first tokens
    A  sender -> receiver  the sender gave up: nothing more will be written
    K  receiver -> sender  the request was taken (ok) or refused, and why
The receiver checks each piece's checksum over its own blocks when the P arrives, and adopts
the request at E once every (layer, block) arrived once and checked out.

Each pool's (layer, K|V, block) regions are prepared as NIXL descriptor lists once (the local
pool at registration, a receiver's pool on first contact), so a WRITE is a pair of index arrays;
NIXL merges regions adjacent on both sides. A receiver publishes its pool's layout, model and
agent metadata (`ReceiverInfo.blob`); a sender checks layout and model before writing a byte.

Progress is driven by this process: a task on the event loop polls the agent, every 0.5 ms
while transfers are in flight or expected (blocks reserved) and every 5 ms otherwise (an idle
NIXL progress thread costs two thirds of a core here). UCX copies a WRITE inside `transfer()`
over shared memory, so WRITEs are posted from the event loop, never from the engine thread
that computes the next layer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from tandem.engine.kv_cache import KVCache, KVSpec
from tandem.kv_store.errors import KVFormatError
from tandem.kv_store.kv_object import KVHeader
from tandem.transfer.base import (
    Handoff,
    KVIdentity,
    KVSink,
    KVTarget,
    KVTransport,
    ReceiverInfo,
    SendSession,
    apply_send_faults,
)
from tandem.transfer.errors import TransferCorrupted, TransferRejected, TransferUnavailable
from tandem.transfer.layout import (
    Piece,
    Reception,
    combined_checksum,
    piece_checksum,
    split_layers,
)

logger = logging.getLogger(__name__)

POLL_ACTIVE_S = 0.0005
POLL_IDLE_S = 0.005
ENDED_KEEP_S = 600.0  # how long a finished or abandoned request is remembered as settled
_BLOB_LEN = struct.Struct("<I")  # receiver blob: u32 length, JSON pool layout, agent metadata


def load_nixl():
    """The NIXL agent API; raises ImportError (or OSError) where NIXL is missing or broken."""
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent, nixl_agent_config


@dataclass(frozen=True)
class _Pool:
    """A KV block pool as NIXL sees it: one registered region of (layer, K|V, block) regions."""

    base: int
    num_blocks: int
    device: int
    mem_type: str  # DRAM or VRAM
    spec: KVSpec
    fingerprint: str

    @classmethod
    def of(cls, cache: KVCache, fingerprint: str) -> _Pool:
        on_device = cache.data.device.type == "cuda"
        return cls(cache.data.data_ptr(), cache.num_blocks,
                   (cache.data.device.index or 0) if on_device else 0,
                   "VRAM" if on_device else "DRAM", cache.spec, fingerprint)

    def encode(self) -> bytes:
        return json.dumps({
            "base": self.base, "num_blocks": self.num_blocks, "device": self.device,
            "mem_type": self.mem_type, "spec": self.spec.model_dump(),
            "fingerprint": self.fingerprint}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> _Pool:
        f = json.loads(raw)
        return cls(int(f["base"]), int(f["num_blocks"]), int(f["device"]), str(f["mem_type"]),
                   KVSpec.model_validate(f["spec"]), str(f["fingerprint"]))

    def regions(self) -> np.ndarray:
        """Every (layer, K|V, block) region as NIXL descriptors [address, length, device]."""
        count = self.spec.num_layers * 2 * self.num_blocks
        size = self.spec.bytes_per_region
        offsets = np.arange(count, dtype=np.uint64) * np.uint64(size)
        return np.stack([offsets + np.uint64(self.base), np.full(count, size, np.uint64),
                         np.full(count, self.device, np.uint64)], axis=1)

    def indices(self, layers: range, blocks: list[int]) -> np.ndarray:
        """Indices into `regions()` of a piece, in piece order (layer, K then V, block)."""
        rows = np.arange(layers.start * 2, layers.stop * 2, dtype=np.int64) * self.num_blocks
        return (rows[:, None] + np.asarray(blocks, dtype=np.int64)[None, :]).reshape(-1) \
            .astype(np.int32)


class NixlTransport(KVTransport):
    name = "nixl"

    def __init__(self) -> None:
        nixl_agent, nixl_agent_config = load_nixl()
        self.agent_name = f"tandem-{uuid.uuid4().hex[:12]}"
        self.agent = nixl_agent(self.agent_name, nixl_agent_config(
            enable_prog_thread=False, backends=["UCX"]))
        self._registered: dict[int, tuple[object, object]] = {}  # base -> (registration, prep)
        self._peers: dict[str, tuple[_Pool, object]] = {}  # receivers we write to, prepped
        self._known: set[str] = set()  # remote agents loaded
        self._receiver: _Inbox | None = None
        self._sessions: dict[tuple[str, str], _NixlSession] = {}  # (peer, request) -> session
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="kv-checksum")
        self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    # -- setup ---------------------------------------------------------------------------------

    def _register(self, cache: KVCache, fingerprint: str) -> tuple[_Pool, object]:
        """Register a pool once, with its regions prepared as the local side of WRITEs."""
        pool = _Pool.of(cache, fingerprint)
        if pool.base not in self._registered:
            nbytes = cache.data.numel() * cache.data.element_size()
            registration = self.agent.register_memory(
                [(pool.base, nbytes, pool.device, "")], pool.mem_type)
            prepped = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", pool.regions(), pool.mem_type)
            self._registered[pool.base] = (registration, prepped)
        return pool, self._registered[pool.base][1]

    async def start_receiver(self, host: str, identity: KVIdentity, cache: KVCache,
                             sink: KVSink) -> ReceiverInfo:
        pool, _ = self._register(cache, identity.fingerprint)
        self._receiver = _Inbox(self, identity, cache, sink)
        layout = pool.encode()
        return ReceiverInfo(self.name, self.agent_name, _BLOB_LEN.pack(len(layout)) + layout
                            + self.agent.get_agent_metadata())

    def _connect(self, receiver: ReceiverInfo) -> tuple[_Pool, object]:
        name = receiver.address
        if name not in self._peers:
            (length,) = _BLOB_LEN.unpack_from(receiver.blob)
            pool = _Pool.decode(receiver.blob[_BLOB_LEN.size:_BLOB_LEN.size + length])
            self._add_agent(name, receiver.blob[_BLOB_LEN.size + length:])
            self._send(name, "H", raw=self.agent.get_agent_metadata())
            prepped = self.agent.prep_xfer_dlist(name, pool.regions(), pool.mem_type)
            self._peers[name] = (pool, prepped)
        return self._peers[name]

    def _add_agent(self, name: str, metadata: bytes) -> None:
        if name not in self._known:
            loaded = self.agent.add_remote_agent(metadata)
            loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
            if loaded != name:
                raise TransferRejected(f"NIXL metadata is for agent {loaded!r}, not {name!r}")
            self._known.add(name)

    def open_session(self, cache: KVCache, fingerprint: str, target: KVTarget,
                     request_id: str) -> SendSession:
        try:
            peer, remote = self._connect(target.receiver)
            local, prepped = self._register(cache, fingerprint)
        except TransferRejected:
            raise
        except Exception as e:  # NIXL raises its own errors for unreachable peers
            raise TransferUnavailable(f"cannot reach NIXL agent {target.receiver.address}: "
                                      f"{e}") from None
        # Checked before any byte moves: a different layout would write outside the blocks.
        if (peer.spec, peer.fingerprint) != (local.spec, local.fingerprint):
            raise TransferRejected(f"decode worker {target.receiver.address} serves "
                                   f"{peer.fingerprint!r} with layout {peer.spec}; this worker "
                                   f"has {local.fingerprint!r} with {local.spec}")
        if not all(0 <= b < peer.num_blocks for b in target.block_ids):
            raise TransferRejected(f"target blocks outside the decode worker's pool "
                                   f"({peer.num_blocks} blocks)")
        session = _NixlSession(self, cache, (local, prepped), (peer, remote), fingerprint,
                               target, request_id)
        self._sessions[(target.receiver.address, request_id)] = session
        return session

    async def settled(self, request_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._receiver is not None and not self._receiver.has_ended(request_id) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self._pump_task.cancel()
        for session in list(self._sessions.values()):
            await session.abort()
        for registration, _ in self._registered.values():
            try:
                self.agent.deregister_memory(registration)
            except Exception as e:
                logger.debug("NIXL deregister failed: %s", e)
        self._registered.clear()
        self.hasher.shutdown(wait=False)

    # -- messages ------------------------------------------------------------------------------

    def _send(self, peer: str, kind: str, raw: bytes = b"", **fields) -> None:
        body = raw or json.dumps(fields, separators=(",", ":")).encode()
        self.agent.send_notif(peer, kind.encode() + body)

    async def _pump(self) -> None:
        while True:
            try:
                for peer, messages in self.agent.get_new_notifs().items():
                    peer = peer.decode() if isinstance(peer, bytes) else peer
                    for message in messages:
                        self._dispatch(peer, message)
                for session in list(self._sessions.values()):
                    session.progress()
                if self._receiver is not None:
                    self._receiver.judge()
            except Exception:
                logger.exception("NIXL progress failed")
            busy = any(s.pending or s.finishing for s in self._sessions.values()) or (
                self._receiver is not None and self._receiver.busy())
            await asyncio.sleep(POLL_ACTIVE_S if busy else POLL_IDLE_S)

    def _dispatch(self, peer: str, message: bytes) -> None:
        kind, body = message[:1], message[1:]
        if kind == b"H":
            self._add_agent(peer, body)
            return
        try:
            fields = json.loads(body)
            request_id = str(fields["r"])
        except (ValueError, KeyError, TypeError):
            logger.warning("dropping a malformed NIXL notification from %s", peer)
            return
        if kind == b"K":
            session = self._sessions.get((peer, request_id))
            if session is not None:
                session.on_reply(fields)
        elif self._receiver is None:
            logger.warning("NIXL notification %r from %s, but this worker receives no KV",
                           kind, peer)
        else:
            self._receiver.on_message(peer, kind, request_id, fields)

    def _forget(self, session: _NixlSession) -> None:
        self._sessions.pop((session.target.receiver.address, session.request_id), None)


class _NixlSession(SendSession):
    def __init__(self, transport: NixlTransport, cache: KVCache, local: tuple[_Pool, object],
                 peer: tuple[_Pool, object], fingerprint: str, target: KVTarget,
                 request_id: str) -> None:
        self.transport, self.cache = transport, cache
        (self.local, self.local_prepped), (self.peer, self.peer_prepped) = local, peer
        self.fingerprint, self.target, self.request_id = fingerprint, target, request_id
        self.agent = transport.agent
        self._loop = asyncio.get_running_loop()
        self.pending: list = []  # xfer handles in flight
        self.pieces: list[Piece] = []
        self.error: str | None = None
        self.closed = False
        self.finishing = False  # waiting for the receiver's answer
        self._reply: asyncio.Future = self._loop.create_future()

    def post(self, layers: range, first_block: int, src_blocks: list[int]) -> None:
        self._loop.call_soon_threadsafe(self._write, layers, first_block, list(src_blocks))

    def _write(self, layers: range, first_block: int, src_blocks: list[int]) -> None:
        # Several WRITEs for a big piece: the receiver checks one while the next is copied.
        # Checksums run on a helper thread (xxhash drops the GIL), one part ahead of the copies.
        parts = split_layers(self.cache.spec, layers, len(src_blocks))
        hashing = self.transport.hasher.submit(piece_checksum, self.cache, parts[0], src_blocks)
        for i, part in enumerate(parts):
            checksum = hashing.result()
            if i + 1 < len(parts):
                hashing = self.transport.hasher.submit(piece_checksum, self.cache, parts[i + 1],
                                                       src_blocks)
            self._write_part(part, first_block, src_blocks, checksum)

    def _write_part(self, layers: range, first_block: int, src_blocks: list[int],
                    checksum: int) -> None:
        if self.closed or self.error:
            return
        dst_blocks = list(self.target.block_ids[first_block:first_block + len(src_blocks)])
        piece = Piece(layers, first_block, len(src_blocks), checksum)
        notif = b"P" + json.dumps({
            "r": self.request_id, "n": self.target.num_tokens, "l": [layers.start, layers.stop],
            "b": [first_block, len(src_blocks)], "c": piece.checksum}).encode()
        try:
            handle = self.agent.make_prepped_xfer(
                "WRITE", self.local_prepped, self.local.indices(layers, src_blocks),
                self.peer_prepped, self.peer.indices(layers, dst_blocks), notif)
            state = self.agent.transfer(handle)
        except Exception as e:
            self.error = f"NIXL WRITE to {self.target.receiver.address} failed: {e}"
            return
        self.pieces.append(piece)
        self.pending.append(handle)
        if state == "ERR":
            self.error = f"NIXL WRITE to {self.target.receiver.address} failed"

    def progress(self) -> None:
        still = []
        for handle in self.pending:
            try:
                state = self.agent.check_xfer_state(handle)
            except Exception as e:
                state, self.error = "ERR", f"NIXL transfer failed: {e}"
            if state == "PROC":
                still.append(handle)
                continue
            if state == "ERR" and self.error is None:
                self.error = f"NIXL WRITE to {self.target.receiver.address} failed"
            self._release(handle)
        self.pending = still

    def _release(self, handle) -> None:
        try:
            self.agent.release_xfer_handle(handle)
        except Exception as e:
            logger.warning("request %s: releasing a NIXL transfer failed: %s",
                           self.request_id, e)

    def on_reply(self, fields: dict) -> None:
        if not self._reply.done():
            self._reply.set_result(fields)

    async def finish(self, handoff: Handoff, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.finishing = True
        try:
            corrupt = await apply_send_faults(self.request_id)
            await asyncio.sleep(0)  # run the posts already scheduled on the loop first
            while self.pending and not self.error and time.monotonic() < deadline:
                self.progress()
                if self.pending:
                    await asyncio.sleep(POLL_ACTIVE_S)
            if self.closed:
                raise TransferRejected(f"request {self.request_id}: the handoff was aborted")
            if self.error:
                raise TransferUnavailable(f"request {self.request_id}: {self.error}")
            if self.pending:
                raise TransferUnavailable(f"request {self.request_id}: KV WRITEs not done "
                                          f"within {timeout:.1f}s")
            spec, n = self.cache.spec, self.target.num_tokens
            checksum = combined_checksum(self.pieces) ^ int(corrupt)  # corrupt: as if damaged
            header = KVHeader(self.fingerprint, spec, n,
                              spec.num_blocks_for(n) * spec.bytes_per_block, checksum)
            self.transport._send(self.target.receiver.address, "E", r=self.request_id,
                                 h=header.encode().hex(), t=handoff.output_token_ids,
                                 p=len(self.pieces))
            try:
                reply = await asyncio.wait_for(self._reply, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise TransferUnavailable(
                    f"request {self.request_id}: the decode worker did not confirm the KV "
                    f"within {timeout:.1f}s") from None
            self.closed = True
            if not reply.get("ok"):
                error = TransferCorrupted if reply.get("code") == "corrupted" else TransferRejected
                raise error(f"KV handoff to {self.target.receiver.address} refused: "
                            f"{reply.get('m', '')}")
        finally:
            if not self.closed:
                await self.abort()
            self.transport._forget(self)

    async def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        for handle in self.pending:
            self._release(handle)
        self.pending = []
        if not self._reply.done():  # a finish() waiting for the answer ends now
            self._reply.set_result({"ok": False, "code": "aborted", "m": "the handoff was aborted"})
        try:
            self.transport._send(self.target.receiver.address, "A", r=self.request_id)
        except Exception as e:
            logger.debug("request %s: could not tell the receiver it was aborted: %s",
                         self.request_id, e)
        self.transport._forget(self)


@dataclass
class _Inbound:
    reception: Reception | None = None  # None until a piece arrives, or if the first was bad
    error: tuple[str, str] | None = None  # (code, message): the first check that failed
    num_pieces: int = 0  # piece notifications seen, good or bad
    end: tuple[str, dict, float] | None = None  # (peer, E fields, deadline) once E arrived


class _Inbox:
    """The receiving side: checks pieces as their notifications arrive, adopts after E.

    E may overtake the notifications of the last WRITEs; it names how many pieces were sent,
    and the request is judged once that many arrived (or `END_WAIT_S` passed)."""

    END_WAIT_S = 5.0

    def __init__(self, transport: NixlTransport, identity: KVIdentity, cache: KVCache,
                 sink: KVSink) -> None:
        self.transport, self.identity, self.cache, self.sink = transport, identity, cache, sink
        self._inbound: dict[str, _Inbound] = {}
        self._ended: dict[str, float] = {}  # request -> when its sender finished or gave up
        self._tasks: set[asyncio.Task] = set()

    def busy(self) -> bool:
        return bool(self._inbound) or self.sink.expecting()

    def has_ended(self, request_id: str) -> bool:
        return request_id in self._ended

    def on_message(self, peer: str, kind: bytes, request_id: str, fields: dict) -> None:
        if kind == b"P":
            inbound = self._inbound.setdefault(request_id, _Inbound())
            inbound.num_pieces += 1
            self._on_piece(request_id, inbound, fields)
        elif kind == b"E":
            self._end(request_id)
            inbound = self._inbound.setdefault(request_id, _Inbound())
            inbound.end = (peer, fields, time.monotonic() + self.END_WAIT_S)
        elif kind == b"A":
            self._end(request_id)
            self._inbound.pop(request_id, None)
            return
        else:
            logger.warning("dropping NIXL notification of unknown kind %r from %s", kind, peer)
            return
        self.judge(request_id)

    def judge(self, request_id: str | None = None) -> None:
        """Settle requests whose E arrived and whose pieces are all in (or overdue)."""
        now = time.monotonic()
        for rid in [request_id] if request_id else list(self._inbound):
            inbound = self._inbound.get(rid)
            if inbound is None or inbound.end is None:
                continue
            peer, fields, deadline = inbound.end
            announced = fields.get("p") if isinstance(fields.get("p"), int) else 0
            if inbound.num_pieces < announced and inbound.error is None and now < deadline:
                continue
            del self._inbound[rid]
            task = asyncio.get_running_loop().create_task(
                self._complete(peer, rid, fields, inbound))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _end(self, request_id: str) -> None:
        now = time.monotonic()
        self._ended[request_id] = now
        for old in [r for r, t in self._ended.items() if now - t > ENDED_KEEP_S]:
            del self._ended[old]

    def _on_piece(self, request_id: str, inbound: _Inbound, fields: dict) -> None:
        blocks = self.sink.blocks_of(request_id)
        if blocks is None or inbound.error is not None:
            return  # aborted here, or already refused; the sender learns at E
        try:
            if inbound.reception is None:
                inbound.reception, inbound.error = self._open(int(fields["n"]), blocks)
                if inbound.error is not None:
                    return
            (lo, hi), (first, count) = fields["l"], fields["b"]
            piece = Piece(range(int(lo), int(hi)), int(first), int(count), int(fields["c"]))
            inbound.reception.check(piece)
        except (ValueError, KeyError, TypeError) as e:
            inbound.error = ("rejected", f"request {request_id}: bad KV piece: {e}")
            return
        got = piece_checksum(self.cache, piece.layers, [blocks[b] for b in piece.blocks])
        if got != piece.checksum:
            inbound.error = ("corrupted", f"request {request_id}: KV checksum mismatch in "
                             f"layers {lo}..{hi}: the data was corrupted")
            return
        inbound.reception.add(piece)
        self.sink.piece_arrived(request_id, piece.layers)

    def _open(self, num_tokens: int, blocks: list[int]) \
            -> tuple[Reception | None, tuple[str, str] | None]:
        if not 0 < num_tokens <= self.identity.max_tokens:
            return None, ("rejected", f"KV of {num_tokens} tokens does not fit the context "
                          f"({self.identity.max_tokens})")
        reception = Reception(self.identity.spec, num_tokens)
        if len(blocks) < reception.num_blocks:
            return None, ("rejected", f"{len(blocks)} blocks reserved, the KV needs "
                          f"{reception.num_blocks}")
        return reception, None

    async def _complete(self, peer: str, request_id: str, fields: dict,
                        inbound: _Inbound) -> None:
        code, message = "rejected", ""
        try:
            header = KVHeader.decode(bytes.fromhex(str(fields["h"])))
            header.check_compatible(self.identity.fingerprint, self.identity.spec)
            tokens = [int(t) for t in fields["t"]]
            if self.sink.blocks_of(request_id) is None:
                raise TransferRejected(f"request {request_id}: no KV blocks are reserved for "
                                       "it here (aborted?)")
            if inbound.error is not None:
                code, message = inbound.error
                raise TransferRejected(message)
            reception = inbound.reception
            if reception is None or header.num_tokens != reception.num_tokens \
                    or reception.missing():
                missing = reception.missing() if reception else "all"
                raise TransferRejected(f"request {request_id}: {missing} (layer, block) "
                                       "regions never arrived")
            if combined_checksum(reception.pieces) != header.checksum:
                code = "corrupted"
                raise TransferRejected(f"request {request_id}: KV checksum mismatch over the "
                                       "transfer: the data was corrupted")
            await self.sink.complete(Handoff(request_id, tokens))
            code = "ok"
        except (TransferRejected, KVFormatError, ValueError, KeyError, TypeError) as e:
            message = message or str(e)
            if code == "corrupted":
                logger.warning("%s", message)
        try:
            self.transport._send(peer, "K", r=request_id, ok=code == "ok", code=code, m=message)
        except Exception as e:
            logger.warning("request %s: could not answer the sender: %s", request_id, e)
