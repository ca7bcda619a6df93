"""The attention worker's end of the attention channel: a TCP server that answers decode
workers' per-layer requests against its `RangeKV`.

One thread per connection (a decode worker keeps one open); a lock serialises access to the
KV, so requests from several decode workers interleave safely. Requests on one connection are
served in order, which is what lets a decode worker send q before the new k/v without waiting.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from dataclasses import dataclass

from tandem.attention_worker.range_kv import RangeKV
from tandem.attention_worker.wire import ErrorKind, Frame, Op, WireError, recv_frame, send_frame
from tandem.engine.errors import OutOfBlocksError

logger = logging.getLogger(__name__)


@dataclass
class ChannelCounters:
    bytes_in: int = 0  # q, k/v and control, from decode workers
    bytes_out: int = 0  # outputs and lse, back to them
    attends: int = 0  # ATTEND requests served (one per layer per step per decode worker)
    appends: int = 0


class ChannelServer:
    def __init__(self, kv: RangeKV, lock: threading.Lock, host: str) -> None:
        self.kv, self.lock = kv, lock
        self.counters = ChannelCounters()
        self._sock = socket.create_server((host, 0))
        self.address = f"{host}:{self._sock.getsockname()[1]}"
        self._conns: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name="attention-channel", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        pending: tuple[ErrorKind, str] | None = None  # a failed APPEND, told on the next reply
        try:
            while True:
                frame, size = recv_frame(conn)
                self.counters.bytes_in += size
                try:
                    with self.lock:
                        reply = self._handle(frame)
                except (OutOfBlocksError, KeyError, ValueError, RuntimeError) as e:
                    kind = ErrorKind.OUT_OF_BLOCKS if isinstance(e, OutOfBlocksError) \
                        else ErrorKind.BAD_REQUEST
                    if frame.op in (Op.APPEND, Op.FREE):
                        pending = pending or (kind, str(e))
                        continue
                    reply = _error(kind, str(e))
                if reply is None:
                    continue
                if pending is not None:
                    reply, pending = _error(*pending), None
                self.counters.bytes_out += send_frame(conn, reply)
        except (WireError, OSError) as e:
            if not self._closed:
                logger.info("attention channel from a decode worker closed: %s", e)
        finally:
            self._conns.discard(conn)
            conn.close()

    def _handle(self, frame: Frame) -> Frame | None:
        kv = self.kv
        if frame.op == Op.ATTEND:
            (scale,) = struct.unpack("<d", frame.fields)
            out, lse = kv.attend(frame.layer, frame.seq_ids, frame.tensors[0], scale)
            self.counters.attends += 1
            return Frame(Op.RESULT, frame.layer, [], b"", [out, lse])
        if frame.op == Op.APPEND:
            keys, values = frame.tensors
            kv.append(frame.layer, frame.seq_ids, keys.to(kv.spec.torch_dtype),
                      values.to(kv.spec.torch_dtype))
            self.counters.appends += 1
            return None
        if frame.op == Op.EXTEND:
            kv.extend(frame.seq_ids)
            return Frame(Op.OK)
        if frame.op == Op.OPEN:
            (first_token,) = struct.unpack("<Q", frame.fields)
            kv.open(frame.seq_ids[0], first_token)
            return Frame(Op.OK)
        if frame.op == Op.FREE:
            for seq_id in frame.seq_ids:
                kv.free(seq_id)
            return None
        raise ValueError(f"op {frame.op.name} is not a request")

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        for conn in list(self._conns):
            conn.close()


def _error(kind: ErrorKind, message: str) -> Frame:
    return Frame(Op.ERROR, 0, [], struct.pack("<B", int(kind)) + message.encode())

