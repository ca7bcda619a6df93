"""`ChannelClient`: a decode worker's handle on one attention worker, over the attention
channel (`wire.py`). It is a `KVHolder`: the offloaded decode step talks to it as to any
holder of KV.

Used from the engine thread only. Requests go out at once; replies come back in order, so
several may be outstanding (q to every holder before any answer; the two micro-batches of
the ping-pong pipeline). Every wait has a deadline: past it, or on any channel failure, the
client is dead and raises `KVHolderLost` for every call, so the step fails only the sequences
this holder serves.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass

import torch

from tandem.attention_worker.wire import ErrorKind, Frame, Op, WireError, recv_frame, send_frame
from tandem.engine.errors import KVHolderLost, OutOfBlocksError


@dataclass
class ChannelStats:
    bytes_sent: int = 0  # q and k/v (and control), to the attention worker
    bytes_received: int = 0  # out and lse, back
    attends: int = 0
    round_trip_s: float = 0.0  # summed over attends: q sent -> out and lse back

    @property
    def mean_round_trip_s(self) -> float:
        return self.round_trip_s / self.attends if self.attends else 0.0


class Reply:
    def __init__(self, client: ChannelClient, sent_at: float) -> None:
        self.client, self.sent_at = client, sent_at
        self.frame: Frame | None = None

    def wait(self) -> Frame:
        while self.frame is None:
            self.client._read_one()
        return self.frame

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """out [B, Hq, D] and lse [B, Hq], fp32 (an ATTEND's reply)."""
        frame = self.wait()
        self.client._check(frame)
        out, lse = frame.tensors
        return out, lse


class ChannelClient:
    def __init__(self, address: str, name: str, timeout_s: float) -> None:
        self.address, self.name, self.timeout_s = address, name, timeout_s
        self.stats = ChannelStats()
        self.dead: str | None = None  # why, once it failed
        self._outstanding: deque[Reply] = deque()
        host, port = address.rsplit(":", 1)
        try:
            self._sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        except OSError as e:
            raise KVHolderLost(name, f"cannot connect to {address}: {e}") from None
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __repr__(self) -> str:
        return f"ChannelClient({self.name})"

    # -- KVHolder ------------------------------------------------------------------------------

    def open(self, seq_id: str, first_token: int) -> None:
        self._check(self._send(Frame(Op.OPEN, 0, [seq_id], struct.pack("<Q", first_token)))
                    .wait())

    def extend(self, seq_ids: list[str]) -> None:
        self._check(self._send(Frame(Op.EXTEND, 0, seq_ids)).wait())

    def append(self, layer: int, seq_ids: list[str], keys: torch.Tensor,
               values: torch.Tensor) -> None:
        self._send(Frame(Op.APPEND, layer, seq_ids, b"", [keys, values]), reply=False)

    def request_attend(self, layer: int, seq_ids: list[str], q: torch.Tensor,
                       scale: float) -> Reply:
        reply = self._send(Frame(Op.ATTEND, layer, seq_ids, struct.pack("<d", scale), [q]))
        assert reply is not None
        return reply

    def free(self, seq_id: str) -> None:
        if self.dead is None:
            with contextlib.suppress(KVHolderLost):  # it holds nothing any more either way
                self._send(Frame(Op.FREE, 0, [seq_id]), reply=False)

    # -- plumbing ------------------------------------------------------------------------------

    def _send(self, frame: Frame, reply: bool = True) -> Reply | None:
        if self.dead is not None:
            raise KVHolderLost(self.name, self.dead)
        try:
            self.stats.bytes_sent += send_frame(self._sock, frame)
        except OSError as e:
            self._fail(f"send failed: {e}")
        if not reply:
            return None
        pending = Reply(self, time.perf_counter())
        self._outstanding.append(pending)
        return pending

    def _read_one(self) -> None:
        if self.dead is not None:
            raise KVHolderLost(self.name, self.dead)
        try:
            frame, size = recv_frame(self._sock)  # the socket's timeout is the deadline
        except TimeoutError:
            self._fail(f"no reply in {self.timeout_s:.1f} s")
        except (OSError, WireError) as e:
            self._fail(str(e))
        self.stats.bytes_received += size
        reply = self._outstanding.popleft()
        reply.frame = frame
        if frame.op == Op.RESULT:
            self.stats.attends += 1
            self.stats.round_trip_s += time.perf_counter() - reply.sent_at

    def _check(self, frame: Frame) -> None:
        if frame.op == Op.ERROR:
            kind, message = frame.fields[0], frame.fields[1:].decode(errors="replace")
            if kind == ErrorKind.OUT_OF_BLOCKS:
                raise OutOfBlocksError(message)
            raise KVHolderLost(self.name, f"refused: {message}")

    def _fail(self, why: str) -> None:
        self.dead = why
        self._outstanding.clear()
        self._sock.close()
        raise KVHolderLost(self.name, why)

    def close(self) -> None:
        self.dead = self.dead or "closed"
        self._sock.close()
