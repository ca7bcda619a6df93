"""The sending side of the NIXL transport: one request's WRITEs, from the prefill worker's
blocks into the decode worker's, and the wait for the decode worker's answer.

`NixlPool` is a KV block pool as NIXL sees it: its (layer, K|V, block) regions are prepared as a
descriptor list once, so a WRITE is a pair of index arrays (NIXL merges regions adjacent on
both sides).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tandem.engine.kv_cache import KVCache, KVSpec
from tandem.transfer.base import (
    Handoff,
    KVTarget,
    SendSession,
    apply_send_faults,
    corrupts_transfer,
)
from tandem.transfer.errors import TransferCorrupted, TransferRejected, TransferUnavailable
from tandem.transfer.layout import (
    Piece,
    combined_checksum,
    native_checksum_kind,
    piece_checksum,
    split_layers,
    transfer_header,
)

if TYPE_CHECKING:
    from tandem.transfer.nixl_transport import NixlTransport

logger = logging.getLogger(__name__)

POLL_ACTIVE_S = 0.0005
ABORT_DRAIN_S = 5.0  # how long an abort waits for WRITEs already in flight


@dataclass(frozen=True)
class NixlPool:
    """A KV block pool as NIXL sees it: one registered region of (layer, K|V, block) regions."""

    base: int
    num_blocks: int
    device: int
    mem_type: str  # DRAM or VRAM
    spec: KVSpec
    fingerprint: str

    @classmethod
    def of(cls, cache: KVCache, fingerprint: str) -> NixlPool:
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
    def decode(cls, raw: bytes) -> NixlPool:
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


class NixlSession(SendSession):
    def __init__(self, transport: NixlTransport, cache: KVCache, local: tuple[NixlPool, object],
                 peer: tuple[NixlPool, object], fingerprint: str, target: KVTarget,
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
        self._corrupt = corrupts_transfer()
        self._reply: asyncio.Future = self._loop.create_future()

    def post(self, layers: range, first_block: int, src_blocks: list[int]) -> None:
        self._loop.call_soon_threadsafe(self._write, layers, first_block, list(src_blocks))

    def _write(self, layers: range, first_block: int, src_blocks: list[int]) -> None:
        # Several WRITEs for a big piece: the receiver checks one while the next is copied.
        # Checksums run on a helper thread (xxhash drops the GIL), one part ahead of the copies;
        # on a GPU they run on the device, and waiting for one also waits for the layer's KV.
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
        # An injected fault damages the first piece: its checksum no longer matches the data.
        announced = piece.checksum ^ int(self._corrupt and not self.pieces)
        notif = b"P" + json.dumps({
            "r": self.request_id, "n": self.target.num_tokens, "l": [layers.start, layers.stop],
            "b": [first_block, len(src_blocks)], "c": announced,
            "h": native_checksum_kind(self.cache)}).encode()
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
            await apply_send_faults(self.request_id)
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
            header = transfer_header(self.fingerprint, self.cache.spec, self.target.num_tokens,
                                     combined_checksum(self.pieces))
            self.transport.send(self.target.receiver.address, "E", r=self.request_id,
                                 h=header.encode().hex(), t=handoff.output_token_ids,
                                 x=handoff.exact_tokens,
                                 p=len(self.pieces))
            try:
                reply = await asyncio.wait_for(self._reply, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise TransferUnavailable(
                    f"request {self.request_id}: the decode worker did not confirm the KV "
                    f"within {timeout:.1f}s") from None
            self.closed = True
            self.transport.forget(self)
            if not reply.get("ok"):
                error = TransferCorrupted if reply.get("code") == "corrupted" else TransferRejected
                raise error(f"KV handoff to {self.target.receiver.address} refused: "
                            f"{reply.get('m', '')}")
        finally:
            self.finishing = False

    async def abort(self) -> None:
        """Stop: wait (up to ABORT_DRAIN_S) for WRITEs in flight, then tell the receiver, so
        neither side frees blocks that are still being read or written."""
        if self.closed:
            return
        self.closed = True
        if not self._reply.done():  # a finish() waiting for the answer ends now
            self._reply.set_result({"ok": False, "code": "aborted", "m": "the handoff was aborted"})
        deadline = time.monotonic() + ABORT_DRAIN_S
        while self.pending and time.monotonic() < deadline:
            self.progress()
            if self.pending:
                await asyncio.sleep(POLL_ACTIVE_S)
        if self.pending:  # not released: NIXL may still be moving them
            logger.warning("request %s: %d NIXL WRITEs still in flight after %.0f s; the decode "
                           "worker keeps its blocks until its own deadline", self.request_id,
                           len(self.pending), ABORT_DRAIN_S)
            self.pending = []
        else:
            try:
                self.transport.send(self.target.receiver.address, "A", r=self.request_id)
            except Exception as e:
                logger.debug("request %s: could not tell the receiver it was aborted: %s",
                             self.request_id, e)
        self.transport.forget(self)
