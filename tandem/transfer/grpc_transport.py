"""KV handoff over a gRPC client stream: Begin, pieces (header + payload bytes), End.

The sender streams each piece as soon as the engine posts it, so a layer's KV is on the wire
while the next layers compute. The receiver checks the KV header against the model and layout
it serves before taking any piece, and each piece's checksum before writing it into the
request's reserved blocks; the reply comes once the sink has taken the request.

Payload messages skip protobuf's object layer on both ends: the sender writes each `KVChunk`
in its wire form (field tag, length, bytes) straight from the gathered blocks, and the receiver
copies the bytes after the tag and length straight into its buffer. That saved three of five
copies: 2000 tokens of bf16 KV (46 MB) between two processes took ~125 ms per send through
protobuf messages and ~95 ms this way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
import torch

from tandem.engine.kv_cache import KVCache
from tandem.kv_store.codec import Codec
from tandem.proto.v1 import kv_transfer_pb2 as pb
from tandem.transfer.base import (
    Handoff,
    KVIdentity,
    KVSink,
    KVTarget,
    KVTransport,
    ReceiverInfo,
    SendSession,
    apply_send_faults,
    corrupts_transfer,
)
from tandem.transfer.coded_piece import AdaptiveCoding, encode_piece, piece_tokens
from tandem.transfer.errors import TransferCorrupted, TransferRejected, TransferUnavailable
from tandem.transfer.grpc_receiver import (
    CHUNK_BYTES,
    OPTIONS,
    PAYLOAD_TAG,
    PUSH_KV,
    SERVICE,
    GrpcReceiver,
    varint,
)
from tandem.transfer.layout import (
    Piece,
    checksum_bytes,
    combined_checksum,
    split_layers,
    transfer_header,
)

logger = logging.getLogger(__name__)

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.CANCELLED}
_END = object()
# A handoff's bandwidth is measured over what it sends after the prefill ended, up to the
# reply: the part on the critical path. Less than this says more about latency than bandwidth.
MEASURED_BYTES = 1 << 20


class GrpcTransport(KVTransport):
    """`codec` (None = raw) codes each piece for the wire, e.g. as a CacheGen bitstream;
    `AdaptiveCoding` picks a level per piece from the measured bandwidth."""

    name = "grpc"

    def __init__(self, codec: Codec | AdaptiveCoding | None = None) -> None:
        raw = codec is None or (isinstance(codec, Codec) and codec.name == "raw")
        self.codec = None if raw else codec
        self._server: grpc.aio.Server | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def start_receiver(self, host: str, identity: KVIdentity, cache: KVCache,
                             sink: KVSink) -> ReceiverInfo:
        self._server = grpc.aio.server(options=OPTIONS)
        handler = grpc.stream_unary_rpc_method_handler(
            GrpcReceiver(identity, cache, sink).PushKV, request_deserializer=None,
            response_serializer=pb.PushKVReply.SerializeToString)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {"PushKV": handler}),))
        port = self._server.add_insecure_port(f"{host}:0")
        await self._server.start()
        return ReceiverInfo(self.name, f"{host}:{port}")

    # Writes happen on the event loop right after the sink named the blocks, so once it stops
    # naming them nothing more lands: there is nothing to wait for.
    async def settled(self, request_id: str, timeout: float) -> None:
        return None

    def open_session(self, cache: KVCache, fingerprint: str, target: KVTarget,
                     request_id: str) -> SendSession:
        return _GrpcSession(self._channel(target.receiver.address), cache, fingerprint, target,
                            request_id, self.codec)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=OPTIONS)
        return self._channels[address]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        if self._server is not None:
            await self._server.stop(grace=1.0)
            self._server = None


class _GrpcSession(SendSession):
    """Pieces go on a queue (from the engine thread); the stream starts with the first one."""

    def __init__(self, channel: grpc.aio.Channel, cache: KVCache, fingerprint: str,
                 target: KVTarget, request_id: str, codec: Codec | AdaptiveCoding | None) \
            -> None:
        self.channel, self.cache, self.target, self.codec = channel, cache, target, codec
        self.request_id, self.fingerprint = request_id, fingerprint
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._call: asyncio.Task | None = None
        self._pieces: list[Piece] = []
        self._corrupt = corrupts_transfer()
        self._aborted = False
        self._finishing: float | None = None  # when the prefill ended (finish was called)
        self._bytes_since_finish = 0

    def post(self, layers: range, first_block: int, src_blocks: list[int]) -> None:
        self._loop.call_soon_threadsafe(self._enqueue, (layers, first_block, list(src_blocks)))

    def _enqueue(self, item) -> None:
        if self._aborted:
            return
        self._queue.put_nowait(item)
        if self._call is None:
            push = self.channel.stream_unary(
                PUSH_KV, request_serializer=None, response_deserializer=pb.PushKVReply.FromString)
            self._call = asyncio.ensure_future(push(self._messages()))
            self._call.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def finish(self, handoff: Handoff, timeout: float) -> None:
        await apply_send_faults(self.request_id)
        await asyncio.sleep(0)  # run the posts already scheduled on the loop before the End
        if self._aborted:
            raise TransferRejected(f"request {self.request_id}: the handoff was aborted")
        self._finishing = time.perf_counter()
        self._enqueue(handoff)
        self._enqueue(_END)
        try:
            await asyncio.wait_for(asyncio.shield(self._call), timeout)
            if isinstance(self.codec, AdaptiveCoding) and \
                    self._bytes_since_finish >= MEASURED_BYTES:
                self.codec.observe(self.target.receiver.address, self._bytes_since_finish,
                                   time.perf_counter() - self._finishing)
        except asyncio.CancelledError:
            if not self._aborted:
                raise
            raise TransferRejected(f"request {self.request_id}: the handoff was aborted") \
                from None
        except TimeoutError:
            self._call.cancel()
            raise TransferUnavailable(f"KV handoff to {self.target.receiver.address} took "
                                      f"longer than {timeout:.1f}s") from None
        except grpc.aio.AioRpcError as e:
            raise _transfer_error(e, self.target.receiver.address) from None

    async def abort(self) -> None:
        self._aborted = True
        if self._call is not None and not self._call.done():
            self._call.cancel()

    async def _messages(self) -> AsyncIterator[bytes]:
        spec = self.cache.spec
        yield pb.KVChunk(begin=pb.Begin(
            request_id=self.request_id,
            kv_header=transfer_header(self.fingerprint, spec, self.target.num_tokens).encode())
        ).SerializeToString()
        handoff = None
        while (item := await self._queue.get()) is not _END:
            if isinstance(item, Handoff):
                handoff = item
                continue
            layers, first_block, src_blocks = item
            for part in split_layers(spec, layers, len(src_blocks)):
                async for wire in self._piece(part, first_block, src_blocks):
                    yield wire
        header = transfer_header(self.fingerprint, spec, self.target.num_tokens,
                                 combined_checksum(self._pieces))
        yield pb.KVChunk(end=pb.End(kv_header=header.encode(),
                                    output_token_ids=handoff.output_token_ids)).SerializeToString()


    async def _piece(self, layers: range, first_block: int, src_blocks: list[int]) \
            -> AsyncIterator[bytes]:
        """A piece's header, then its bytes in wire-form payload chunks."""
        data = await asyncio.to_thread(self.cache.gather, layers, src_blocks)
        codec = self.codec
        if codec is None:
            payload = memoryview(data.view(torch.uint8).view(-1).numpy())
        else:
            spec = self.cache.spec
            tokens = piece_tokens(spec, self.target.num_tokens, first_block, len(src_blocks))
            if isinstance(codec, AdaptiveCoding):
                adaptive = codec
                codec = adaptive.pick(self.target.receiver.address,
                                      tokens * len(layers) // spec.num_layers,
                                      self.target.num_tokens)
            payload = memoryview(await asyncio.to_thread(
                encode_piece, codec, data, layers, tokens, first_block * spec.block_size))
        piece = Piece(layers, first_block, len(src_blocks),
                      await asyncio.to_thread(checksum_bytes, payload))
        self._pieces.append(piece)
        yield pb.KVChunk(piece=pb.PieceHeader(
            first_layer=layers.start, num_layers=len(layers), first_block=first_block,
            num_blocks=piece.num_blocks, checksum=piece.checksum,
            codec=codec.name if codec else "",
            payload_bytes=len(payload))).SerializeToString()
        for offset in range(0, len(payload), CHUNK_BYTES):
            part = payload[offset:offset + CHUNK_BYTES]
            wire = b"".join((PAYLOAD_TAG, varint(len(part)), part))
            if self._corrupt:
                self._corrupt = False
                wire = wire[:-1] + bytes([wire[-1] ^ 0x01])  # one bit flipped in transit
            yield wire
        if self._finishing is not None:
            self._bytes_since_finish += len(payload)


def _transfer_error(e: grpc.aio.AioRpcError, address: str) -> Exception:
    what = f"KV handoff to {address} failed: {e.details()}"
    if e.code() in _RETRYABLE:
        return TransferUnavailable(what)
    if e.code() == grpc.StatusCode.DATA_LOSS:
        return TransferCorrupted(what)
    return TransferRejected(what)
