"""The receiving side of the NIXL transport: checks each piece when its notification arrives
(the data is already in the reserved blocks), and adopts the request once every (layer, block)
arrived and checked out.

The final notification (E) may overtake those of the last WRITEs; it says how many pieces were
sent, and the request is judged once that many arrived (or `END_WAIT_S` passed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem.engine.kv_cache import KVCache
from tandem.kv_store.errors import KVFormatError
from tandem.kv_store.kv_object import KVHeader
from tandem.transfer.base import Handoff, KVIdentity, KVSink
from tandem.transfer.errors import TransferRejected
from tandem.transfer.layout import (
    CHECKSUM_KINDS,
    Piece,
    Reception,
    combined_checksum,
    piece_checksum,
)

logger = logging.getLogger(__name__)

ENDED_KEEP_S = 600.0  # how long a finished or abandoned request is remembered as settled
STALE_S = 60.0  # an incoming transfer silent this long, with no E, is dropped (sender gone)
Send = Callable[..., None]  # send(peer, kind, **fields): a control notification


@dataclass
class Inbound:
    reception: Reception | None = None  # None until a piece arrives, or if the first was bad
    error: tuple[str, str] | None = None  # (code, message): the first check that failed
    num_pieces: int = 0  # piece notifications seen, good or bad
    end: tuple[str, dict, float] | None = None  # (peer, E fields, deadline) once E arrived
    last: float = field(default_factory=time.monotonic)  # when a notification last came


class NixlInbox:
    """Incoming transfers of one receiver, by request."""

    END_WAIT_S = 5.0

    def __init__(self, identity: KVIdentity, cache: KVCache, sink: KVSink, send: Send) -> None:
        self.identity, self.cache, self.sink, self.send = identity, cache, sink, send
        self._inbound: dict[str, Inbound] = {}
        self._ended: dict[str, float] = {}  # request -> when its sender finished or gave up
        self._tasks: set[asyncio.Task] = set()

    def receiving(self) -> bool:
        return bool(self._inbound)

    def has_ended(self, request_id: str) -> bool:
        return request_id in self._ended

    def forget(self, request_id: str) -> None:
        """A new reservation under this id: earlier transfers' state must not apply to it."""
        self._ended.pop(request_id, None)
        self._inbound.pop(request_id, None)

    def on_message(self, peer: str, kind: bytes, request_id: str, fields: dict) -> None:
        if kind == b"P":
            if self.sink.blocks_of(request_id) is None:
                return  # for a request not (or no longer) reserved here
            inbound = self._inbound.setdefault(request_id, Inbound())
            inbound.num_pieces += 1
            inbound.last = time.monotonic()
            self._on_piece(request_id, inbound, fields)
        elif kind == b"E":
            self._end(request_id)
            inbound = self._inbound.setdefault(request_id, Inbound())
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
            if inbound is not None and inbound.end is None and now - inbound.last > STALE_S:
                logger.warning("request %s: its KV sender went silent; dropping the transfer",
                               rid)
                del self._inbound[rid]
                continue
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

    def _on_piece(self, request_id: str, inbound: Inbound, fields: dict) -> None:
        blocks = self.sink.blocks_of(request_id)
        if blocks is None or inbound.error is not None:
            return  # aborted here, or already refused; the sender learns at E
        try:
            if inbound.reception is None:
                inbound.reception, inbound.error = self._open(int(fields["n"]), blocks,
                                                              self.sink.kv_in_place(request_id))
                if inbound.error is not None:
                    return
            (lo, hi), (first, count) = fields["l"], fields["b"]
            piece = Piece(range(int(lo), int(hi)), int(first), int(count), int(fields["c"]))
            kind = fields.get("h", "xxh3")
            if kind not in CHECKSUM_KINDS:
                raise ValueError(f"unknown checksum kind {kind!r}")
            inbound.reception.check(piece)
        except (ValueError, KeyError, TypeError) as e:
            inbound.error = ("rejected", f"request {request_id}: bad KV piece: {e}")
            return
        got = piece_checksum(self.cache, piece.layers, [blocks[b] for b in piece.blocks], kind)
        if got != piece.checksum:
            inbound.error = ("corrupted", f"request {request_id}: KV checksum mismatch in "
                             f"layers {lo}..{hi}: the data was corrupted")
            return
        inbound.reception.add(piece)
        self.sink.piece_arrived(request_id, piece.layers)

    def _open(self, num_tokens: int, blocks: list[int], in_place: int) \
            -> tuple[Reception | None, tuple[str, str] | None]:
        if not 0 < num_tokens <= self.identity.max_tokens:
            return None, ("rejected", f"KV of {num_tokens} tokens does not fit the context "
                          f"({self.identity.max_tokens})")
        reception = Reception(self.identity.spec, num_tokens)
        if len(blocks) < reception.num_blocks:
            return None, ("rejected", f"{len(blocks)} blocks reserved, the KV needs "
                          f"{reception.num_blocks}")
        try:
            reception.mark_present(in_place)
        except ValueError as e:
            return None, ("rejected", str(e))
        return reception, None

    async def _complete(self, peer: str, request_id: str, fields: dict,
                        inbound: Inbound) -> None:
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
            exact = fields.get("x")
            await self.sink.complete(Handoff(request_id, tokens,
                                             None if exact is None else int(exact)),
                                     header.num_tokens)
            code = "ok"
        except (TransferRejected, KVFormatError, ValueError, KeyError, TypeError) as e:
            message = message or str(e)
            if code == "corrupted":
                logger.warning("%s", message)
        except Exception as e:  # the sender must hear back either way, not wait it out
            logger.exception("request %s: taking the KV failed", request_id)
            code, message = "rejected", f"request {request_id}: the decode worker failed: {e}"
        try:
            self.send(peer, "K", r=request_id, ok=code == "ok", code=code, m=message)
        except Exception as e:
            logger.warning("request %s: could not answer the sender: %s", request_id, e)
