"""The attention channel's frames: one persistent TCP stream per (decode worker, attention
worker), carrying per-layer requests and replies with no Ray call and no pickle.

A frame is a fixed header then a payload:

    magic "TAW1" | version u8 | op u8 | layer i16 | payload bytes u64 | crc32 of payload u32

The payload is the sequence ids (a u32 count, then each as u16 length + utf-8), then the op's
fixed fields, then tensors (each: dtype u8, ndim u8, dims u32..., raw bytes). Every frame is
checked (magic, version, size bound, checksum) before anything in it is used.
"""

from __future__ import annotations

import socket
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum

import torch

MAGIC = b"TAW1"
VERSION = 1
HEADER = struct.Struct("<4sBBhQI")
MAX_PAYLOAD = 1 << 31  # a frame larger than this is refused before it is read


class Op(IntEnum):
    OPEN = 1  # seq ids (one), first token u64 -> OK | ERROR
    EXTEND = 2  # seq ids -> OK | ERROR (out of blocks: takes nothing)
    ATTEND = 3  # layer, seq ids, scale f64, q -> RESULT (out, lse)
    APPEND = 4  # layer, seq ids, k, v -> no reply (a failure answers the next request)
    FREE = 5  # seq ids -> no reply
    OK = 16
    RESULT = 17
    ERROR = 18  # kind u8 (ErrorKind), utf-8 message


class ErrorKind(IntEnum):
    OUT_OF_BLOCKS = 1
    BAD_REQUEST = 2


class WireError(Exception):
    """A frame that does not check out (bad magic, version, size or checksum), or a peer that
    closed the stream."""


_DTYPES = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}
_CODES = {v: k for k, v in _DTYPES.items()}


@dataclass
class Frame:
    op: Op
    layer: int = 0
    seq_ids: list[str] = field(default_factory=list)
    fields: bytes = b""  # the op's fixed fields (struct-packed by the caller)
    tensors: list[torch.Tensor] = field(default_factory=list)

    def encode(self) -> list[bytes | memoryview]:
        """The frame as buffers for `sendmsg` (tensors are not copied)."""
        parts: list[bytes | memoryview] = [struct.pack("<I", len(self.seq_ids))]
        for seq_id in self.seq_ids:
            raw = seq_id.encode()
            parts.append(struct.pack("<H", len(raw)) + raw)
        parts.append(struct.pack("<I", len(self.fields)) + self.fields)
        parts.append(struct.pack("<B", len(self.tensors)))
        for t in self.tensors:
            t = t.detach().contiguous().cpu()
            parts.append(struct.pack(f"<BB{t.dim()}I", _CODES[t.dtype], t.dim(), *t.shape))
            parts.append(memoryview(t.view(torch.uint8).numpy()).cast("B")
                         if t.numel() else b"")
        size = sum(len(p) for p in parts)
        crc = 0
        for p in parts:
            crc = zlib.crc32(p, crc)
        return [HEADER.pack(MAGIC, VERSION, int(self.op), self.layer, size, crc), *parts]


def send_frame(sock: socket.socket, frame: Frame) -> int:
    """Write `frame`; the bytes sent."""
    parts = frame.encode()
    sock.sendall(b"".join(parts))
    return sum(len(p) for p in parts)


def recv_frame(sock: socket.socket) -> tuple[Frame, int]:
    """Read and check one frame; the frame and its size in bytes."""
    magic, version, op, layer, size, crc = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if magic != MAGIC:
        raise WireError(f"not an attention-channel frame (magic {magic!r})")
    if version != VERSION:
        raise WireError(f"attention-channel frame version {version}; this end speaks {VERSION}")
    if size > MAX_PAYLOAD:
        raise WireError(f"attention-channel frame of {size} bytes exceeds {MAX_PAYLOAD}")
    payload = _recv_exact(sock, size)
    if zlib.crc32(payload) != crc:
        raise WireError("attention-channel frame failed its checksum")
    try:
        return _decode(Op(op), layer, memoryview(payload)), HEADER.size + size
    except (struct.error, ValueError, KeyError, RuntimeError) as e:
        raise WireError(f"malformed attention-channel frame: {e}") from None


def _decode(op: Op, layer: int, buf: memoryview) -> Frame:
    at = 0

    def take(n: int) -> memoryview:
        nonlocal at
        if at + n > len(buf):
            raise ValueError("frame ends early")
        at += n
        return buf[at - n:at]

    (count,) = struct.unpack("<I", take(4))
    if count > len(buf):
        raise ValueError(f"{count} sequence ids in a frame of {len(buf)} bytes")
    seq_ids = []
    for _ in range(count):
        (n,) = struct.unpack("<H", take(2))
        seq_ids.append(bytes(take(n)).decode())
    (n_fields,) = struct.unpack("<I", take(4))
    fields = bytes(take(n_fields))
    (n_tensors,) = struct.unpack("<B", take(1))
    tensors = []
    for _ in range(n_tensors):
        code, ndim = struct.unpack("<BB", take(2))
        shape = struct.unpack(f"<{ndim}I", take(4 * ndim))
        dtype = _DTYPES[code]
        numel = 1
        for d in shape:
            numel *= d
        raw = take(numel * torch.empty((), dtype=dtype).element_size())
        flat = torch.frombuffer(bytearray(raw), dtype=dtype) if numel else \
            torch.empty(0, dtype=dtype)
        tensors.append(flat.view(*shape))
    if at != len(buf):
        raise ValueError(f"{len(buf) - at} stray bytes after the frame's tensors")
    return Frame(op, layer, seq_ids, fields, tensors)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise WireError("the attention channel was closed by its peer")
        got += k
    return bytes(buf)
