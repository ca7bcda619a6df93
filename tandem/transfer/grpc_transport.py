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

With `tls` (`ClusterTLS`) both ends speak mutual TLS under the cluster CA; a peer on the other
setting or under another CA fails the handshake: TransferUnavailable at once, naming TLS.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

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
    REFUSAL_KEY,
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

if TYPE_CHECKING:
    from tandem.tls import ClusterTLS

logger = logging.getLogger(__name__)

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.CANCELLED}
_END = object()
_STOP = object()  # the receiver refused the stream: send nothing more
SETTLE_POLL_S = 0.01
# A handoff's bandwidth is measured over what it sends after the prefill ended, up to the
# reply: the part on the critical path. Less than this says more about latency than bandwidth.
MEASURED_BYTES = 1 << 20


class GrpcTransport(KVTransport):
    """`codec` (None = raw) codes each piece for the wire, e.g. as a CacheGen bitstream;
    `AdaptiveCoding` picks a level per piece from the measured bandwidth."""

    name = "grpc"

    def __init__(self, codec: Codec | AdaptiveCoding | None = None,
                 tls: ClusterTLS | None = None) -> None:
        raw = codec is None or (isinstance(codec, Codec) and codec.name == "raw")
        self.codec = None if raw else codec
        self.tls = tls
        self._server: grpc.aio.Server | None = None
        self._receiver: GrpcReceiver | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def start_receiver(self, host: str, identity: KVIdentity, cache: KVCache,
                             sink: KVSink) -> ReceiverInfo:
        self._server = grpc.aio.server(options=OPTIONS)
        self._receiver = GrpcReceiver(identity, cache, sink)
        handler = grpc.stream_unary_rpc_method_handler(
            self._receiver.PushKV, request_deserializer=None,
            response_serializer=pb.PushKVReply.SerializeToString)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {"PushKV": handler}),))
        address = f"[{host}]" if ":" in host else host  # an IPv6 literal needs brackets
        # Exactly `host`: a worker told to use loopback must not listen on the network.
        if self.tls is not None:
            port = self._server.add_secure_port(f"{address}:0", self.tls.server_credentials())
        else:
            port = self._server.add_insecure_port(f"{address}:0")
        if not port:
            raise OSError(f"the gRPC KV receiver cannot bind {address} (worker host setting)")
        await self._server.start()
        return ReceiverInfo(self.name, f"{address}:{port}")

    async def settled(self, request_id: str, timeout: float) -> None:
        # Raw pieces are written on the event loop right after the sink named the blocks; a
        # coded piece is decoded on a thread in between. Wait for those (bounded): the
        # receiver asks for the blocks again before writing, so even past the deadline nothing
        # lands in blocks released meanwhile.
        deadline = time.monotonic() + timeout
        while self._receiver is not None and self._receiver.writing(request_id):
            if time.monotonic() >= deadline:
                logger.warning("request %s: a KV piece is still being decoded after %.1f s; "
                               "its blocks are released anyway (it will not be written)",
                               request_id, timeout)
                return
            await asyncio.sleep(SETTLE_POLL_S)

    def open_session(self, cache: KVCache, fingerprint: str, target: KVTarget,
                     request_id: str) -> SendSession:
        return _GrpcSession(self._channel(target.receiver.address), cache, fingerprint, target,
                            request_id, self.codec, self.tls is not None)

    def _channel(self, address: str) -> grpc.aio.Channel:
        tls = self.tls
        if address not in self._channels:
            self._channels[address] = grpc.aio.secure_channel(
                address, tls.channel_credentials(), options=OPTIONS + tls.channel_options()) \
                if tls else grpc.aio.insecure_channel(address, options=OPTIONS)
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
                 target: KVTarget, request_id: str, codec: Codec | AdaptiveCoding | None,
                 tls: bool) -> None:
        self.channel, self.cache, self.target, self.codec = channel, cache, target, codec
        self.request_id, self.fingerprint, self.tls = request_id, fingerprint, tls
        self._refusal: tuple[str, str] | None = None  # (status code name, message), if refused
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
            self._call = asyncio.ensure_future(self._run(push(self._messages())))
            self._call.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _run(self, call: grpc.aio.StreamUnaryCall) -> pb.PushKVReply:
        watch = asyncio.ensure_future(self._watch(call))
        watch.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            return await call
        finally:
            watch.cancel()
            call.cancel()  # ends the RPC when this task is cancelled; a no-op once it is done

    async def _watch(self, call: grpc.aio.StreamUnaryCall) -> None:
        """A receiver that refuses the stream says so in its initial metadata at once: stop
        streaming KV nobody reads, so its status comes back now, not at the End."""
        refusal = (await call.initial_metadata() or {}).get(REFUSAL_KEY)
        if refusal:
            code, _, message = bytes(refusal).decode(errors="replace").partition(":")
            self._refusal = (code, message)
            self._queue.put_nowait(_STOP)  # wakes the stream if it waits for a piece

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
            code, details = e.code(), e.details() or ""
            if code == grpc.StatusCode.INTERNAL and self._refusal is not None:
                # grpc's asyncio client may report a write cut off by the refusal as INTERNAL
                # (grpc/grpc#36066): the receiver's own words came in the metadata.
                name, details = self._refusal
                code = grpc.StatusCode.__members__.get(name, grpc.StatusCode.FAILED_PRECONDITION)
            raise _transfer_error(code, details, self.target.receiver.address, self.tls) \
                from None

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
            if self._refusal is not None:
                return  # half-closes the stream: the receiver answers with its status now
            if isinstance(item, Handoff):
                handoff = item
                continue
            layers, first_block, src_blocks = item
            for part in split_layers(spec, layers, len(src_blocks)):
                if self._refusal is not None:
                    return
                async for wire in self._piece(part, first_block, src_blocks):
                    yield wire
        header = transfer_header(self.fingerprint, spec, self.target.num_tokens,
                                 combined_checksum(self._pieces))
        yield pb.KVChunk(end=pb.End(kv_header=header.encode(),
                                    output_token_ids=handoff.output_token_ids,
                                    exact_tokens=handoff.exact_tokens)).SerializeToString()

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
            if self._refusal is not None:
                return
            part = payload[offset:offset + CHUNK_BYTES]
            wire = b"".join((PAYLOAD_TAG, varint(len(part)), part))
            if self._corrupt:
                self._corrupt = False
                wire = wire[:-1] + bytes([wire[-1] ^ 0x01])  # one bit flipped in transit
            yield wire
        if self._finishing is not None:
            self._bytes_since_finish += len(payload)


def _transfer_error(code: grpc.StatusCode, details: str, address: str, tls: bool) -> Exception:
    what = f"KV handoff to {address} failed: {details}"
    if code == grpc.StatusCode.UNAVAILABLE:  # a TLS mismatch looks like any failed connection
        mode = "mutual TLS (worker.tls)" if tls else "plaintext (no worker.tls)"
        return TransferUnavailable(f"{what} [sent over {mode}: if the decode worker is up, both "
                                   "ends need the same TLS setting, one cluster CA or no TLS]")
    if code in _RETRYABLE:
        return TransferUnavailable(what)
    if code == grpc.StatusCode.DATA_LOSS:
        return TransferCorrupted(what)
    return TransferRejected(what)
