"""KV transport conformance, run for every transport over real loopback connections (NIXL over
UCX, gRPC over TCP): blocks land byte-identical in the reserved blocks layer by layer or in one
piece, foreign KV is refused, corruption is caught, unreachable peers are reported, and an
aborted transfer settles."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest
import torch

from tandem.engine.kv_cache import KVCache, KVSpec
from tandem.faults import active_faults
from tandem.transfer import TRANSPORTS, make_transport
from tandem.transfer.base import Handoff, KVIdentity, KVSink, KVTarget, ReceiverInfo
from tandem.transfer.errors import TransferCorrupted, TransferRejected, TransferUnavailable

from .conftest import require_nixl

SPEC = KVSpec(num_layers=4, num_kv_heads=3, head_dim=64, dtype="bfloat16", block_size=16)
IDENTITY = KVIdentity("model-a", SPEC, max_tokens=4096)
SRC_BLOCKS = [3, 4, 5, 9, 1, 2, 11]  # runs and gaps on both sides
DST_BLOCKS = [7, 8, 0, 1, 2, 12, 13]


class Sink(KVSink):
    def __init__(self, blocks: dict[str, list[int]], refuse: str | None = None) -> None:
        self.blocks, self.refuse = blocks, refuse
        self.completed: list[Handoff] = []
        self.arrivals: list[tuple[float, range]] = []

    def blocks_of(self, request_id: str) -> list[int] | None:
        return self.blocks.get(request_id)

    def piece_arrived(self, request_id: str, layers: range) -> None:
        self.arrivals.append((time.monotonic(), layers))

    async def complete(self, handoff: Handoff, num_tokens: int) -> None:
        if self.refuse:
            raise TransferRejected(self.refuse)
        self.completed.append(handoff)


def filled_pool(num_blocks: int = 16) -> KVCache:
    cache = KVCache(SPEC, num_blocks, torch.device("cpu"))
    cache.data.copy_(torch.randn(cache.data.shape).to(torch.bfloat16))
    return cache


async def exchange(name: str, num_tokens: int = 100, *, layerwise: bool = True,
                   fingerprint: str = "model-a", sink: Sink | None = None,
                   receiver: ReceiverInfo | None = None, timeout: float = 10, codec=None):
    """Send a request's KV from one pool to another; returns (source, destination, sink)."""
    n = SPEC.num_blocks_for(num_tokens)
    src, dst = filled_pool(), KVCache(SPEC, 16, torch.device("cpu"))
    sink = sink or Sink({"r1": DST_BLOCKS[:n]})
    receiving, sending = make_transport(name), make_transport(name, codec)
    try:
        info = await receiving.start_receiver("127.0.0.1", IDENTITY, dst, sink)
        receiving.admit(sending.introduction())  # what the prefill worker does through Ray
        session = sending.open_session(src, fingerprint,
                                       KVTarget(receiver or info, tuple(DST_BLOCKS[:n]),
                                                num_tokens), "r1")
        if layerwise:
            for layer in range(SPEC.num_layers):
                session.post(range(layer, layer + 1), 0, SRC_BLOCKS[:n])
        else:
            session.post(range(SPEC.num_layers), 0, SRC_BLOCKS[:n])
        await session.finish(Handoff("r1", [7]), timeout=timeout)
    finally:
        await sending.close()
        await receiving.close()
    return src, dst, sink


@contextlib.asynccontextmanager
async def connected(name: str, sink: Sink, blocks: tuple[int, ...], num_tokens: int):
    """A receiver with `sink` and a sender's session for request r1 into `blocks`; yields
    (session, receiving transport)."""
    receiving, sending = make_transport(name), make_transport(name)
    try:
        info = await receiving.start_receiver("127.0.0.1", IDENTITY,
                                              KVCache(SPEC, 16, torch.device("cpu")), sink)
        receiving.admit(sending.introduction())
        yield sending.open_session(filled_pool(), "model-a", KVTarget(info, blocks, num_tokens),
                                   "r1"), receiving
    finally:
        await sending.close()
        await receiving.close()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    if request.param == "nixl":
        require_nixl()
    return request.param


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "onepiece"])
def test_blocks_land_byte_identical_in_the_reserved_blocks(transport, layerwise):
    n = SPEC.num_blocks_for(100)
    src, dst, sink = asyncio.run(exchange(transport, 100, layerwise=layerwise))
    assert sink.completed == [Handoff("r1", [7])]
    layers = range(SPEC.num_layers)
    assert same_bytes(dst.gather(layers, DST_BLOCKS[:n]), src.gather(layers, SRC_BLOCKS[:n]))
    untouched = [b for b in range(16) if b not in DST_BLOCKS[:n]]
    assert not dst.gather(layers, untouched).any()
    assert len(sink.arrivals) == (SPEC.num_layers if layerwise else 1)


def test_kv_of_another_model_is_rejected(transport):
    with pytest.raises(TransferRejected, match="model-b"):
        asyncio.run(exchange(transport, 5, fingerprint="model-b"))


def test_sink_refusal_reaches_the_sender(transport):
    with pytest.raises(TransferRejected, match="unknown request r1"):
        asyncio.run(exchange(transport, 5, sink=Sink({"r1": [7]}, refuse="unknown request r1")))


def test_kv_for_a_request_without_reserved_blocks_is_refused(transport):
    sink = Sink({})
    with pytest.raises(TransferRejected, match="reserved"):
        asyncio.run(exchange(transport, 20, sink=sink))
    assert not sink.completed


def test_a_missing_piece_is_refused(transport):
    async def main():
        async with connected(transport, Sink({"r1": [7, 8]}), (7, 8), 20) as (session, _):
            session.post(range(0, 3), 0, SRC_BLOCKS[:2])  # the last layer never comes
            await session.finish(Handoff("r1", [7]), timeout=10)

    with pytest.raises(TransferRejected, match="never arrived"):
        asyncio.run(main())


def test_corruption_in_transit_is_detected(transport, monkeypatch):
    monkeypatch.setenv("TANDEM_FAULTS", "transfer.corrupt=1")
    active_faults.cache_clear()
    try:
        with pytest.raises(TransferCorrupted, match="checksum"):
            asyncio.run(exchange(transport, 20))
    finally:
        monkeypatch.delenv("TANDEM_FAULTS")
        active_faults.cache_clear()


def test_unreachable_grpc_receiver_is_retryable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransferUnavailable) as err:
        asyncio.run(exchange("grpc", 5, receiver=ReceiverInfo("grpc", f"127.0.0.1:{port}")))
    assert err.value.retryable


def test_silent_nixl_receiver_ends_the_wait_at_the_deadline():
    require_nixl()

    async def main():
        src = filled_pool()
        gone = make_transport("nixl")
        info = await gone.start_receiver("127.0.0.1", IDENTITY,
                                         KVCache(SPEC, 16, torch.device("cpu")),
                                         Sink({"r1": [0, 1]}))
        gone._pump_task.cancel()  # alive but never answers
        sending = make_transport("nixl")
        try:
            session = sending.open_session(src, "model-a", KVTarget(info, (0, 1), 20), "r1")
            session.post(range(SPEC.num_layers), 0, [3, 4])
            started = time.monotonic()
            with pytest.raises(TransferUnavailable, match=r"did not confirm|not done"):
                await session.finish(Handoff("r1", [7]), timeout=1.0)
            return time.monotonic() - started
        finally:
            await sending.close()
            await gone.close()

    assert asyncio.run(main()) < 5.0


def test_aborted_sender_settles_the_receiver(transport):
    async def main():
        async with connected(transport, Sink({"r1": [0, 1]}), (0, 1), 20) as (session, receiving):
            session.post(range(0, 1), 0, [3, 4])
            await asyncio.sleep(0.05)
            await session.abort()
            started = time.monotonic()
            await receiving.settled("r1", timeout=10)
            return time.monotonic() - started

    assert asyncio.run(main()) < 5.0


@pytest.mark.parametrize("messages", [
    [b"\x12\x03abc"],  # payload before any Begin
    ["begin", b"\x12\x03abc"],  # payload outside a piece
    ["begin", "piece", b"\x12\x09abc"],  # a payload chunk shorter than its length says
    ["begin", "end"],  # End before any KV
])
def test_grpc_receiver_refuses_malformed_streams(messages):
    import grpc

    from tandem.kv_store.kv_object import KVHeader
    from tandem.proto.v1 import kv_transfer_pb2 as pb
    from tandem.transfer.grpc_transport import PUSH_KV

    header = KVHeader("model-a", SPEC, 5, SPEC.bytes_per_block, 0).encode()
    known = {
        "begin": pb.KVChunk(begin=pb.Begin(request_id="r1", kv_header=header)),
        "piece": pb.KVChunk(piece=pb.PieceHeader(first_layer=0, num_layers=1, first_block=0,
                                                 num_blocks=1, checksum=1)),
        "end": pb.KVChunk(end=pb.End(kv_header=header, output_token_ids=[7])),
    }
    wire = [known[m].SerializeToString() if isinstance(m, str) else m for m in messages]
    sink = Sink({"r1": [0]}, refuse="malformed KV reached the sink")

    async def main():
        receiver = make_transport("grpc")
        address = (await receiver.start_receiver(
            "127.0.0.1", IDENTITY, KVCache(SPEC, 4, torch.device("cpu")), sink)).address
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                push = channel.stream_unary(PUSH_KV)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await push(iter(wire), timeout=10)
                return err.value.code()
        finally:
            await receiver.close()

    assert asyncio.run(main()) == grpc.StatusCode.INVALID_ARGUMENT


def test_abort_ends_a_finish_that_waits_for_the_receiver(transport):
    class SlowSink(Sink):
        async def complete(self, handoff: Handoff, num_tokens: int) -> None:
            await asyncio.sleep(30)

    async def main():
        async with connected(transport, SlowSink({"r1": [0, 1]}), (0, 1), 20) as (session, _):
            session.post(range(SPEC.num_layers), 0, [3, 4])
            finishing = asyncio.ensure_future(session.finish(Handoff("r1", [7]), timeout=20))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            await session.abort()
            with pytest.raises(TransferRejected, match="aborted"):
                await finishing
            return time.monotonic() - started

    assert asyncio.run(main()) < 2.0


def test_a_request_id_reserved_again_gets_a_fresh_transfer(transport):
    async def main():
        sink = Sink({"r1": [0, 1]})
        receiving, sending = make_transport(transport), make_transport(transport)
        try:
            info = await receiving.start_receiver(
                "127.0.0.1", IDENTITY, KVCache(SPEC, 16, torch.device("cpu")), sink)
            receiving.admit(sending.introduction())
            for _ in range(2):
                receiving.reserved("r1")
                session = sending.open_session(filled_pool(), "model-a",
                                               KVTarget(info, (0, 1), 20), "r1")
                session.post(range(SPEC.num_layers), 0, [3, 4])
                await session.finish(Handoff("r1", [7]), timeout=10)
        finally:
            await sending.close()
            await receiving.close()
        return sink.completed

    assert asyncio.run(main()) == [Handoff("r1", [7])] * 2


@pytest.fixture
def cachegen_profile(tmp_path, monkeypatch):
    """A CacheGen profile for SPEC's shape, where `get_codec` finds it."""
    import numpy as np

    from tandem.kv_store.codec import profile as profiles
    from tandem.kv_store.codec.profile import CacheGenProfile, profile_path

    channels = SPEC.num_kv_heads * SPEC.head_dim
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    profiles._profiles_by_id.cache_clear()
    shape = (SPEC.num_layers, 2, channels)
    profile = CacheGenProfile("model-a", SPEC.num_layers, channels,
                              np.zeros(shape, np.float32), np.full(shape, 0.8, np.float32),
                              np.full(shape, 0.5, np.float32))
    profile.save(profile_path("model-a", profiles.cache_dir()))
    yield profile
    profiles._profiles_by_id.cache_clear()


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "onepiece"])
def test_grpc_with_cachegen_lands_within_the_codecs_error(cachegen_profile, layerwise):
    from tandem.kv_store.codec import get_codec

    channels = SPEC.num_kv_heads * SPEC.head_dim
    codec = get_codec(f"cachegen:1:{cachegen_profile.id}")
    n = SPEC.num_blocks_for(100)
    src, dst, sink = asyncio.run(exchange("grpc", 100, layerwise=layerwise, codec=codec))
    # Lossy-coded KV arrives marked approximate: none of it may enter a prefix cache.
    assert sink.completed == [Handoff("r1", [7], exact_tokens=0)]
    layers = range(SPEC.num_layers)
    sent = src.gather(layers, SRC_BLOCKS[:n]).float().reshape(4, 2, -1, channels)[:, :, :100]
    got = dst.gather(layers, DST_BLOCKS[:n]).float().reshape(4, 2, -1, channels)[:, :, :100]
    bound = codec.max_error(0, 0) + sent.abs() * 2**-8
    assert bool(((sent - got).abs() <= bound).all())
    assert torch.equal(got[:, :, :4], sent[:, :, :4])  # the sink tokens travel exact
    assert not torch.equal(got, sent)  # it really was coded lossily


def test_adaptive_coding_picks_coarser_levels_as_the_measured_bandwidth_drops(cachegen_profile):
    from tandem.kv_store.codec import get_codec
    from tandem.transfer.coded_piece import AdaptiveCoding

    codecs = {level: get_codec(f"cachegen:{level}:{cachegen_profile.id}") for level in (0, 4)}
    coding = AdaptiveCoding(codecs, SPEC, budget_s=0.1)
    *_, sink = asyncio.run(exchange("grpc", 100, codec=coding))  # loopback: fast
    assert sink.completed and set(coding.controller.choices) == {"0"}
    assert coding.pick("10.0.0.9:1", 100, 100) is codecs[0]
    coding.observe("10.0.0.9:1", 100_000, 1.0)  # 100 kB/s to that receiver
    assert coding.pick("10.0.0.9:1", 100, 100) is codecs[4]
