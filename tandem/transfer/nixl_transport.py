"""KV handoff with NIXL: one-sided WRITEs from the prefill worker's blocks straight into the
blocks the decode worker reserved, over UCX (RDMA on a GPU cluster, shared memory or loopback
here).

Agent metadata travels only through the control path (Ray), never over NIXL itself: a receiver
publishes its own in `ReceiverInfo.blob`, and a sender hands its own (`introduction()`) to the
decode worker before its first WRITE, which loads it (`admit`). Notifications from an agent it
was not told about, and the `H` (metadata) notifications older senders sent, are ignored.

Control messages are NIXL notifications, one byte of kind then JSON (never pickle):
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
while KV is moving, every 2 ms while it is expected (blocks reserved) and every 5 ms otherwise
(an idle NIXL progress thread costs two thirds of a core here). UCX copies a WRITE inside
`transfer()` over shared memory, so WRITEs are posted from the event loop, never from the
engine thread that computes the next layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import struct
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from tandem.engine.kv_cache import KVCache
from tandem.transfer.base import (
    KVIdentity,
    KVSink,
    KVTarget,
    KVTransport,
    ReceiverInfo,
    SendSession,
)
from tandem.transfer.errors import TransferRejected, TransferUnavailable
from tandem.transfer.nixl_inbox import NixlInbox
from tandem.transfer.nixl_session import POLL_ACTIVE_S, NixlPool, NixlSession

logger = logging.getLogger(__name__)

POLL_EXPECTING_S = 0.002
POLL_IDLE_S = 0.005
_BLOB_LEN = struct.Struct("<I")  # receiver blob: u32 length, JSON pool layout, agent metadata
IGNORED_LOGGED = 64  # unknown agents named in the log; past that, the rest are ignored quietly


def load_nixl():
    """The NIXL agent API; raises ImportError (or OSError) where NIXL is missing or broken."""
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent, nixl_agent_config


class NixlTransport(KVTransport):
    name = "nixl"

    def __init__(self, host: str | None = None) -> None:
        nixl_agent, nixl_agent_config = load_nixl()
        keep_ucx_on_loopback(host)
        self.agent_name = f"tandem-{uuid.uuid4().hex[:12]}"
        # No listener thread: NIXL's own metadata exchange over a socket would take any peer's
        # metadata; ours goes through Ray.
        self.agent = nixl_agent(self.agent_name, nixl_agent_config(
            enable_prog_thread=False, enable_listen_thread=False, backends=["UCX"]))
        self._registered: dict[int, tuple[object, object]] = {}  # base -> (registration, prep)
        self._peers: dict[str, tuple[NixlPool, object]] = {}  # receivers we write to, prepped
        self._known: set[str] = set()  # remote agents loaded, all from the control path
        self._ignored: set[str] = set()  # unknown agents already logged
        self._receiver: NixlInbox | None = None
        self._sessions: dict[tuple[str, str], NixlSession] = {}  # (peer, request) -> session
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="kv-checksum")
        self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    # -- setup ---------------------------------------------------------------------------------

    def _register(self, cache: KVCache, fingerprint: str) -> tuple[NixlPool, object]:
        """Register a pool once, with its regions prepared as the local side of WRITEs."""
        pool = NixlPool.of(cache, fingerprint)
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
        self._receiver = NixlInbox(identity, cache, sink, self.send)
        layout = pool.encode()
        return ReceiverInfo(self.name, self.agent_name, _BLOB_LEN.pack(len(layout)) + layout
                            + self.agent.get_agent_metadata())

    def _connect(self, receiver: ReceiverInfo) -> tuple[NixlPool, object]:
        name = receiver.address
        if name not in self._peers:
            (length,) = _BLOB_LEN.unpack_from(receiver.blob)
            pool = NixlPool.decode(receiver.blob[_BLOB_LEN.size:_BLOB_LEN.size + length])
            self._add_agent(name, receiver.blob[_BLOB_LEN.size + length:])
            prepped = self.agent.prep_xfer_dlist(name, pool.regions(), pool.mem_type)
            self._peers[name] = (pool, prepped)
        return self._peers[name]

    @property
    def peer_id(self) -> str:
        return self.agent_name

    def forget_peers(self, peer_ids: set[str]) -> None:
        """Unload the agents of workers that are gone, so a restarted worker's new agent is
        the only one this worker talks to, and the old one's prepared regions are freed."""
        for name in peer_ids & (self._known | set(self._peers)):
            peer = self._peers.pop(name, None)
            if peer is not None:
                with contextlib.suppress(Exception):
                    self.agent.release_dlist_handle(peer[1])
            self._known.discard(name)
            try:
                self.agent.remove_remote_agent(name)
            except Exception as e:  # an agent NIXL never connected to
                logger.debug("NIXL: removing agent %s: %s", name, e)
            logger.info("NIXL: dropped the agent of a worker that is gone (%s)", name)

    def known_peers(self) -> list[str]:
        return sorted(self._known)

    def introduction(self) -> bytes:
        name = self.agent_name.encode()
        return _BLOB_LEN.pack(len(name)) + name + self.agent.get_agent_metadata()

    def admit(self, introduction: bytes) -> None:
        try:
            (length,) = _BLOB_LEN.unpack_from(introduction)
            name = introduction[_BLOB_LEN.size:_BLOB_LEN.size + length].decode()
        except (struct.error, UnicodeDecodeError) as e:
            raise TransferRejected(f"malformed NIXL sender introduction: {e}") from None
        self._add_agent(name, introduction[_BLOB_LEN.size + length:])

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
        session = NixlSession(self, cache, (local, prepped), (peer, remote), fingerprint,
                               target, request_id)
        self._sessions[(target.receiver.address, request_id)] = session
        return session

    def reserved(self, request_id: str) -> None:
        if self._receiver is not None:
            self._receiver.forget(request_id)

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

    def send(self, peer: str, kind: str, **fields) -> None:
        body = json.dumps(fields, separators=(",", ":")).encode()
        self.agent.send_notif(peer, kind.encode() + body)

    async def _pump(self) -> None:
        while True:
            try:
                for peer, messages in self.agent.get_new_notifs().items():
                    peer = peer.decode() if isinstance(peer, bytes) else peer
                    for message in messages:
                        try:  # one bad message must not cost the others in the batch
                            self._dispatch(peer, message)
                        except Exception:
                            logger.exception("NIXL notification from %s failed", peer)
                for session in list(self._sessions.values()):
                    session.progress()
                if self._receiver is not None:
                    self._receiver.judge()
            except Exception:
                logger.exception("NIXL progress failed")
            await asyncio.sleep(self._poll_interval())

    def _poll_interval(self) -> float:
        """Eager while KV moves, a little slower while it is only expected (blocks reserved:
        measured 10% of a core at 0.5 ms, 3% at 5 ms), lazy otherwise."""
        receiver = self._receiver
        if any(s.pending or s.finishing for s in self._sessions.values()) or (
                receiver is not None and receiver.receiving()):
            return POLL_ACTIVE_S
        if receiver is not None and receiver.sink.expecting():
            return POLL_EXPECTING_S
        return POLL_IDLE_S

    def _dispatch(self, peer: str, message: bytes) -> None:
        kind, body = message[:1], message[1:]
        if kind == b"H" or peer not in self._known:
            self._ignore(peer, kind)
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

    def _ignore(self, peer: str, kind: bytes) -> None:
        """Drop a notification from an agent not introduced through Ray, or one carrying agent
        metadata (H): loading metadata from whoever reaches the UCX port would let any of them
        act as a sender. Logged once per agent."""
        if peer in self._ignored or len(self._ignored) >= IGNORED_LOGGED:
            return
        self._ignored.add(peer)
        why = "agent metadata is only taken through Ray" if kind == b"H" else \
            "it was not introduced through Ray"
        logger.warning("ignoring NIXL notifications (%r) from agent %.80r: %s", kind, peer, why)

    def forget(self, session: NixlSession) -> None:
        self._sessions.pop((session.target.receiver.address, session.request_id), None)


def keep_ucx_on_loopback(host: str | None) -> None:
    """UCX's TCP transport listens on every network device unless told otherwise; a worker
    bound to loopback (one machine) must not accept connections from the network. Applies to
    agents created after it, and only where UCX_NET_DEVICES is not set already. Other hosts are
    left alone: naming one device there would also turn off RDMA devices."""
    try:
        loopback = host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback and "UCX_NET_DEVICES" not in os.environ:
        os.environ["UCX_NET_DEVICES"] = "lo"
