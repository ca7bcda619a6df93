"""The receiving side of the gRPC KV transport, and the stream's wire helpers.

The receiver checks the KV header against the model and layout it serves before taking any
piece, each piece's checksum before writing it into the request's reserved blocks, and at End
that every (layer, block) arrived once. A piece is written on the event loop right after the
sink named its blocks; a coded piece is decoded on a thread first, so the blocks are asked for
again once it is decoded, and `writing(request_id)` says a piece is between the two (the
transport's `settled` waits for that before the blocks may be freed). Payload messages are read
in their wire form: the bytes after the field tag and length go straight into the piece's buffer.

A refused stream is told at once in the initial metadata (`REFUSAL_KEY`), so the sender stops
streaming; its status follows once the sender half-closed, or after `DRAIN_S` at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError

from tandem.engine.kv_cache import KVCache, KVSpec
from tandem.kv_store.codec import Codec, get_codec
from tandem.kv_store.errors import KVFormatError
from tandem.kv_store.kv_object import KVHeader
from tandem.proto.v1 import kv_transfer_pb2 as pb
from tandem.transfer.base import Handoff, KVIdentity, KVSink
from tandem.transfer.coded_piece import decode_piece, piece_tokens
from tandem.transfer.errors import TransferRejected
from tandem.transfer.layout import Piece, Reception, checksum_bytes, combined_checksum

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
OPTIONS = [("grpc.max_receive_message_length", 4 * CHUNK_BYTES),
           ("grpc.max_send_message_length", 4 * CHUNK_BYTES)]
SERVICE = pb.DESCRIPTOR.services_by_name["KVTransfer"].full_name
PUSH_KV = f"/{SERVICE}/PushKV"
PAYLOAD_TAG = bytes([pb.KVChunk.PAYLOAD_FIELD_NUMBER << 3 | 2])  # length-delimited field
# How long a refused stream is read (and discarded) before its status goes out: a sender that
# heard of the refusal (REFUSAL_KEY) half-closes within a round trip; one that keeps streaming
# must not hold the handler and its buffers for long, so after this the call is aborted anyway.
DRAIN_S = 5.0
REFUSAL_KEY = "tandem-refusal-bin"  # initial metadata of a refused stream: b"CODE:message"


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _payload_view(wire: bytes) -> memoryview | None:
    """The bytes of a wire-form `KVChunk{payload}`; None if it is another message."""
    if not wire or wire[0] != PAYLOAD_TAG[0]:
        return None
    length, shift, i = 0, 0, 1
    while True:
        if i >= len(wire) or shift > 35:
            raise ValueError("truncated payload chunk")
        byte = wire[i]
        length |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            break
    if i + length != len(wire):
        raise ValueError("payload chunk length does not match its message")
    return memoryview(wire)[i:]


class GrpcReceiver:
    def __init__(self, identity: KVIdentity, cache: KVCache, sink: KVSink) -> None:
        self.identity, self.cache, self.sink = identity, cache, sink
        self._writing: Counter[str] = Counter()  # request -> pieces between check and write

    def writing(self, request_id: str) -> bool:
        """Whether a piece of `request_id` is being checked, decoded or written now."""
        return self._writing[request_id] > 0

    @contextlib.contextmanager
    def _busy(self, request_id: str) -> Iterator[None]:
        self._writing[request_id] += 1
        try:
            yield
        finally:
            self._writing[request_id] -= 1
            if not self._writing[request_id]:
                del self._writing[request_id]

    async def PushKV(self, request_iterator, context: grpc.aio.ServicerContext) \
            -> pb.PushKVReply:
        stream = aiter(request_iterator)
        try:
            return await self._receive(stream)
        except _Refused as e:
            logger.warning("refused a KV stream: %s", e.message)
            try:  # the sender stops streaming when it reads this, not at its End
                refusal = f"{e.code.name}:{e.message}".encode()[:1024]
                await context.send_initial_metadata(((REFUSAL_KEY, refusal),))
            except Exception as failed:  # the call already ended: nobody left to tell
                logger.debug("could not send the refusal early: %s", failed)
            # Read the rest (discarding it) before answering: ending a client stream while it
            # still writes can make grpc's asyncio client report INTERNAL instead of this status
            # (grpc/grpc#36066). Bounded: a sender that keeps streaming is cut off.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_drain(stream), DRAIN_S)
            await context.abort(e.code, e.message)

    async def _receive(self, stream) -> pb.PushKVReply:
        begin = _message(await anext(stream, None))
        if begin.WhichOneof("part") != "begin":
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "stream must open with a Begin")
        request_id = begin.begin.request_id
        header = self._check_header(begin.begin.kv_header)
        reception = Reception(header.spec, header.num_tokens)
        if self._blocks(request_id, reception) is None:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                           f"request {request_id}: no KV blocks are reserved for it here")
        try:
            reception.mark_present(self.sink.kv_in_place(request_id))
        except ValueError as e:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                           f"request {request_id}: {e}") from None
        piece, buf, filled, codec, lossy = None, bytearray(), 0, None, False
        async for wire in stream:
            try:
                part = _payload_view(wire)
            except ValueError as e:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            if part is not None:
                if piece is None or filled + len(part) > len(buf):
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                   "payload bytes beyond the current piece")
                buf[filled:filled + len(part)] = part
                filled += len(part)
                if filled == len(buf):
                    with self._busy(request_id):
                        await self._write(request_id, reception, piece, buf, codec)
                    piece = None
                continue
            if piece is not None:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"piece cut short: {filled} of {len(buf)} bytes")
            message = _message(wire)
            kind = message.WhichOneof("part")
            if kind == "piece":
                piece, filled = self._start_piece(message.piece, reception), 0
                codec = self._codec(message.piece)
                lossy = lossy or (codec is not None and not codec.lossless)
                raw_bytes = piece.num_bytes(reception.spec)
                if codec is not None and message.piece.payload_bytes > raw_bytes:
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"coded piece of {message.piece.payload_bytes} bytes is "
                                   f"larger than its raw KV ({raw_bytes})")
                buf = bytearray(message.piece.payload_bytes if codec else raw_bytes)
            elif kind == "end":
                end = message.end
                handoff = Handoff(request_id, list(end.output_token_ids),
                                  end.exact_tokens if end.HasField("exact_tokens") else None)
                handoff = handoff.limited_to(0 if lossy else None)
                self._check_end(message.end.kv_header, header, reception)
                try:
                    await self.sink.complete(handoff, header.num_tokens)
                except (TransferRejected, ValueError) as e:
                    raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
                return pb.PushKVReply()
            else:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind} message")
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "stream ended before its End")

    def _check_header(self, raw: bytes) -> KVHeader:
        try:
            header = KVHeader.decode(raw)
            header.check_compatible(self.identity.fingerprint, self.identity.spec)
        except KVFormatError as e:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
        if header.num_tokens > self.identity.max_tokens:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"KV of {header.num_tokens} tokens exceeds the context "
                           f"({self.identity.max_tokens})")
        return header

    def _blocks(self, request_id: str, reception: Reception) -> list[int] | None:
        blocks = self.sink.blocks_of(request_id)
        if blocks is not None and len(blocks) < reception.num_blocks:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                           f"request {request_id}: {len(blocks)} blocks reserved, the KV "
                           f"needs {reception.num_blocks}")
        return blocks

    @staticmethod
    def _start_piece(header: pb.PieceHeader, reception: Reception) -> Piece:
        piece = Piece(range(header.first_layer, header.first_layer + header.num_layers),
                      header.first_block, header.num_blocks, header.checksum)
        try:
            reception.check(piece)
        except ValueError as e:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        return piece

    def _codec(self, header: pb.PieceHeader) -> Codec | None:
        """The codec a piece names (None: raw bytes); refused if unknown here."""
        if not header.codec:
            return None
        try:
            codec = get_codec(header.codec)
            codec.check(self.identity.fingerprint, self.identity.spec)
        except KVFormatError as e:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
        return codec

    async def _write(self, request_id: str, reception: Reception, piece: Piece,
                     buf: bytearray, codec: Codec | None) -> None:
        if await asyncio.to_thread(checksum_bytes, buf) != piece.checksum:
            raise _Refused(grpc.StatusCode.DATA_LOSS,
                           f"request {request_id}: KV checksum mismatch in layers "
                           f"{piece.layers.start}..{piece.layers.stop}: the data was corrupted")
        blocks = self._blocks(request_id, reception)  # again: it may have been aborted since
        if blocks is None:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                           f"request {request_id}: its reserved blocks were released")
        if codec is None:
            data = _as_tensor(buf, reception.spec, piece)
        else:
            spec = reception.spec
            tokens = piece_tokens(spec, reception.num_tokens, piece.first_block, piece.num_blocks)
            try:
                data = await asyncio.to_thread(decode_piece, codec, buf, spec, piece.layers,
                                               tokens)
            except KVFormatError as e:
                raise _Refused(grpc.StatusCode.DATA_LOSS,
                               f"request {request_id}: coded KV piece is unusable: {e}") from None
            # Asked again: an abort may have released the blocks while the piece was decoded,
            # and another request may hold them now. Only the same blocks, still reserved, do.
            if self._blocks(request_id, reception) != blocks:
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                               f"request {request_id}: its reserved blocks were released while "
                               f"a piece was decoded")
        self.cache.scatter(piece.layers, [blocks[b] for b in piece.blocks], data)
        reception.add(piece)
        self.sink.piece_arrived(request_id, piece.layers)

    @staticmethod
    def _check_end(raw: bytes, begin: KVHeader, reception: Reception) -> None:
        try:
            end = KVHeader.decode(raw)
        except KVFormatError as e:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if (end.fingerprint, end.spec, end.num_tokens) != \
                (begin.fingerprint, begin.spec, begin.num_tokens):
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "End header differs from Begin")
        if reception.missing():
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{reception.missing()} (layer, block) regions never arrived")
        if combined_checksum(reception.pieces) != end.checksum:
            raise _Refused(grpc.StatusCode.DATA_LOSS, "KV checksum mismatch over the transfer")


async def _drain(stream) -> None:
    async for _ in stream:
        pass


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _message(raw: bytes | None) -> pb.KVChunk:
    try:
        return pb.KVChunk.FromString(raw or b"")
    except DecodeError:
        return pb.KVChunk()


def _as_tensor(buf: bytearray, spec: KVSpec, piece: Piece) -> torch.Tensor:
    flat = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8))
    return flat.view(spec.torch_dtype).view(
        len(piece.layers), 2, piece.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
