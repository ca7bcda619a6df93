"""KV transfers must not touch what is not theirs, over real loopback transports:
- gRPC: an abort that lands while a coded piece is decoded leaves the blocks alone once they are
  handed to another request, and `settled` holds them until the decode is over (bounded);
- gRPC: a refused stream ends fast: the sender hears of the refusal at once and stops, and a
  sender that keeps streaming anyway is cut off after `DRAIN_S`, with the refusal's status;
- NIXL: agent metadata comes only through the control path (Ray): a receiver loads none from a
  notification, and ignores a sender it was not introduced to;
- NIXL: a worker bound to loopback keeps UCX's listeners there."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from tandem.engine.kv_cache import KVCache
from tandem.kv_store.kv_object import KVHeader
from tandem.proto.v1 import kv_transfer_pb2 as pb
from tandem.transfer import grpc_receiver, make_transport
from tandem.transfer.base import Handoff, KVTarget
from tandem.transfer.errors import TransferRejected, TransferUnavailable

from .conftest import require_nixl
from .test_transfer import IDENTITY, SPEC, Sink, filled_pool

LAYERS = range(SPEC.num_layers)
SENTINEL = 3.0


@pytest.fixture
def cachegen(tmp_path, monkeypatch):
    """A CacheGen codec for SPEC's shape (its profile where `get_codec` finds it)."""
    from tandem.kv_store.codec import get_codec
    from tandem.kv_store.codec import profile as profiles
    from tandem.kv_store.codec.profile import CacheGenProfile, profile_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    profiles._profiles_by_id.cache_clear()
    shape = (SPEC.num_layers, 2, SPEC.num_kv_heads * SPEC.head_dim)
    profile = CacheGenProfile("model-a", SPEC.num_layers, shape[2], np.zeros(shape, np.float32),
                              np.full(shape, 0.8, np.float32), np.full(shape, 0.5, np.float32))
    profile.save(profile_path("model-a", profiles.cache_dir()))
    yield get_codec(f"cachegen:1:{profile.id}")
    profiles._profiles_by_id.cache_clear()


@pytest.fixture
def slow_decode(monkeypatch):
    """The gRPC receiver's piece decoding sets `started`, then waits for `release`."""
    started, release = threading.Event(), threading.Event()
    real = grpc_receiver.decode_piece

    def decode(*args):
        started.set()
        release.wait(10)
        return real(*args)

    monkeypatch.setattr(grpc_receiver, "decode_piece", decode)
    yield started, release
    release.set()


async def abort_during_decode(codec, slow_decode, settle_timeout: float,
                              release_after: float | None) \
        -> tuple[float, KVCache, BaseException | None]:
    """Abort request r1 (the sink stops naming its blocks, then `settled`, as the decode worker
    does) while its coded piece is decoded; then hand the blocks to another request, which
    fills them with SENTINEL. The decode ends `release_after` s into the abort, or (None) once
    the blocks changed hands. Returns (how long settled took, the receiver's pool, what the
    sender's finish raised)."""
    started, release = slow_decode
    sink, dst = Sink({"r1": [0, 1]}), KVCache(SPEC, 16, torch.device("cpu"))
    receiving, sending = make_transport("grpc"), make_transport("grpc", codec)
    try:
        info = await receiving.start_receiver("127.0.0.1", IDENTITY, dst, sink)
        session = sending.open_session(filled_pool(), "model-a", KVTarget(info, (0, 1), 20), "r1")
        session.post(LAYERS, 0, [3, 4])
        finishing = asyncio.ensure_future(session.finish(Handoff("r1", [7]), timeout=10))
        assert await asyncio.to_thread(started.wait, 10), "the piece never reached the decode"
        del sink.blocks["r1"]
        if release_after is not None:
            asyncio.get_running_loop().call_later(release_after, release.set)
        begun = time.monotonic()
        await receiving.settled("r1", timeout=settle_timeout)
        waited = time.monotonic() - begun
        dst.data[:, :, [0, 1]] = SENTINEL  # the blocks' next request wrote its KV
        release.set()
        (error,) = await asyncio.gather(finishing, return_exceptions=True)
        await asyncio.sleep(0.1)  # anything still scheduled on the loop lands now
        return waited, dst, error
    finally:
        await sending.close()
        await receiving.close()


def untouched(dst: KVCache) -> bool:
    return bool((dst.gather(LAYERS, [0, 1]).float() == SENTINEL).all())


def refused_as_released(error: BaseException | None) -> bool:
    return isinstance(error, TransferRejected) and "released" in str(error)


def test_settled_holds_the_blocks_until_the_decode_is_over(cachegen, slow_decode):
    waited, dst, error = asyncio.run(abort_during_decode(cachegen, slow_decode, 10,
                                                         release_after=0.3))
    assert untouched(dst)
    assert waited >= 0.25  # not freed under a piece that may still be written
    assert refused_as_released(error), error


def test_a_decode_that_outlasts_settled_never_writes_the_released_blocks(cachegen, slow_decode):
    waited, dst, error = asyncio.run(abort_during_decode(cachegen, slow_decode, 0.2,
                                                         release_after=None))
    assert untouched(dst)  # the reservation is asked for again after the decode
    assert waited < 2.0  # settled is bounded by its timeout
    assert refused_as_released(error), error


def test_a_refused_sender_stops_streaming_at_once(monkeypatch):
    drained: list[float] = []
    real_drain = grpc_receiver._drain

    async def drain(stream) -> None:
        await real_drain(stream)
        drained.append(time.monotonic())

    monkeypatch.setattr(grpc_receiver, "_drain", drain)

    async def main() -> float:
        receiving, sending = make_transport("grpc"), make_transport("grpc")
        try:
            info = await receiving.start_receiver(
                "127.0.0.1", IDENTITY, KVCache(SPEC, 16, torch.device("cpu")), Sink({}))
            session = sending.open_session(filled_pool(), "model-a", KVTarget(info, (0, 1), 20),
                                           "r1")
            begun = time.monotonic()
            for _ in range(20):  # a long layer-wise prefill: posts for 2 s after the refusal
                session.post(range(0, 1), 0, [3, 4])
                await asyncio.sleep(0.1)
            finish_at = time.monotonic()
            with pytest.raises(TransferRejected, match="no KV blocks are reserved"):
                await session.finish(Handoff("r1", [7]), timeout=10)
            assert time.monotonic() - finish_at < 1.0
            return begun
        finally:
            await sending.close()
            await receiving.close()

    begun = asyncio.run(main())
    assert drained and drained[0] - begun < 1.0  # the sender half-closed on hearing of it


def test_a_sender_that_keeps_streaming_is_cut_off_with_the_refusal(monkeypatch):
    assert grpc_receiver.DRAIN_S <= 5.0
    monkeypatch.setattr(grpc_receiver, "DRAIN_S", 0.5)
    header = KVHeader("model-a", SPEC, 5, SPEC.bytes_per_block, 0).encode()
    begin = pb.KVChunk(begin=pb.Begin(request_id="r1", kv_header=header)).SerializeToString()

    async def forever():  # ignores the refusal in the metadata and never half-closes
        yield begin
        while True:
            yield pb.KVChunk(piece=pb.PieceHeader(first_layer=0, num_layers=1)) \
                .SerializeToString()
            await asyncio.sleep(0.01)

    async def main() -> tuple[grpc.StatusCode, str, float]:
        receiver = make_transport("grpc")
        address = (await receiver.start_receiver(
            "127.0.0.1", IDENTITY, KVCache(SPEC, 4, torch.device("cpu")), Sink({}))).address
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                begun = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await channel.stream_unary(grpc_receiver.PUSH_KV)(forever(), timeout=10)
                return err.value.code(), err.value.details(), time.monotonic() - begun
        finally:
            await receiver.close()

    code, details, seconds = asyncio.run(main())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "reserved" in details
    assert seconds < 3.0  # DRAIN_S, not the sender's own 10 s deadline


@pytest.fixture
def nixl():
    require_nixl()


def test_nixl_takes_no_agent_metadata_from_a_notification(nixl, caplog):
    async def main():
        sink = Sink({"r1": [0, 1]})
        receiving, sending, stranger = (make_transport("nixl") for _ in range(3))
        try:
            info = await receiving.start_receiver(
                "127.0.0.1", IDENTITY, KVCache(SPEC, 16, torch.device("cpu")), sink)
            session = sending.open_session(filled_pool(), "model-a", KVTarget(info, (0, 1), 20),
                                           "r1")  # it knows the receiver, but was not introduced
            for metadata in (stranger.agent.get_agent_metadata(),
                             sending.agent.get_agent_metadata()):
                sending.agent.send_notif(info.address, b"H" + metadata)
            session.post(LAYERS, 0, [3, 4])
            with pytest.raises(TransferUnavailable, match="did not confirm"):
                await session.finish(Handoff("r1", [7]), timeout=1.0)
            await session.abort()
            loaded = [receiving.agent.check_remote_metadata(a.agent_name)
                      for a in (stranger, sending)]
            assert not sink.arrivals and not sink.completed  # its pieces were not even looked at

            receiving.admit(sending.introduction())  # what the prefill worker does through Ray
            again = sending.open_session(filled_pool(), "model-a", KVTarget(info, (0, 1), 20),
                                         "r2")
            sink.blocks["r2"] = [0, 1]
            again.post(LAYERS, 0, [3, 4])
            await again.finish(Handoff("r2", [7]), timeout=10)
            return loaded, sink.completed
        finally:
            for transport in (sending, stranger, receiving):
                await transport.close()

    with caplog.at_level(logging.WARNING, logger="tandem.transfer.nixl_transport"):
        loaded, completed = asyncio.run(main())
    assert loaded == [False, False]
    assert completed == [Handoff("r2", [7])]
    ignored = [r for r in caplog.records if r.getMessage().startswith("ignoring NIXL")]
    assert len(ignored) == 1 and "through Ray" in ignored[0].getMessage()  # once per agent


def test_nixl_keeps_ucx_on_loopback_for_a_loopback_host(monkeypatch):
    from tandem.transfer.nixl_transport import keep_ucx_on_loopback

    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    for host in (None, "10.1.2.3", "node-7.example"):
        keep_ucx_on_loopback(host)
        assert "UCX_NET_DEVICES" not in os.environ, host
    keep_ucx_on_loopback("127.0.0.1")
    assert os.environ["UCX_NET_DEVICES"] == "lo"
    monkeypatch.setenv("UCX_NET_DEVICES", "mlx5_0:1")
    keep_ucx_on_loopback("::1")
    assert os.environ["UCX_NET_DEVICES"] == "mlx5_0:1"  # an operator's choice stands
