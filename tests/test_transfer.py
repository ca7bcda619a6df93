"""KV transport conformance, run for every transport over real loopback connections:
lossless delivery, refusal of foreign KV, corruption caught, unreachable peers reported."""

from __future__ import annotations

import asyncio
import socket

import pytest
import torch

from tandem.engine.kv_cache import KVBlocks, KVSpec
from tandem.faults import active_faults
from tandem.transfer import TRANSPORTS, make_transport
from tandem.transfer.base import Handoff, KVIdentity
from tandem.transfer.errors import (
    TransferCorrupted,
    TransferRejected,
    TransferUnavailable,
)

SPEC = KVSpec(num_layers=4, num_kv_heads=3, head_dim=64, dtype="bfloat16", block_size=16)
IDENTITY = KVIdentity("model-a", SPEC, max_tokens=4096)


def kv_of(num_tokens: int) -> KVBlocks:
    shape = (SPEC.num_layers, 2, SPEC.num_blocks_for(num_tokens), SPEC.block_size,
             SPEC.num_kv_heads, SPEC.head_dim)
    return KVBlocks(SPEC, num_tokens, torch.randn(shape).to(torch.bfloat16))


async def exchange(name: str, kv: KVBlocks, fingerprint: str = "model-a", sink=None,
                   address: str | None = None):
    """Start a receiver, send `kv` to it, return what the sink got."""
    received: list[tuple[Handoff, KVBlocks]] = []

    async def collect(handoff: Handoff, got: KVBlocks) -> None:
        received.append((handoff, got))

    receiver, sender = make_transport(name), make_transport(name)
    try:
        bound = await receiver.start_receiver("127.0.0.1", IDENTITY, sink or collect)
        await sender.send(address or bound, Handoff("r1", [7]), kv, fingerprint, timeout=10)
    finally:
        await sender.close()
        await receiver.close()
    return received


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


def test_kv_arrives_bit_exact_with_its_handoff(transport):
    kv = kv_of(100)  # several payload chunks' worth
    ((handoff, got),) = asyncio.run(exchange(transport, kv))
    assert handoff == Handoff("r1", [7])
    assert got.num_tokens == 100 and got.spec == SPEC
    assert torch.equal(got.data.view(torch.int16), kv.data.view(torch.int16))


def test_kv_of_another_model_is_rejected(transport):
    with pytest.raises(TransferRejected, match="model"):
        asyncio.run(exchange(transport, kv_of(5), fingerprint="model-b"))


def test_sink_refusal_reaches_the_sender(transport):
    async def refuse(handoff, kv):
        raise TransferRejected("unknown request r1")

    with pytest.raises(TransferRejected, match="unknown request r1"):
        asyncio.run(exchange(transport, kv_of(5), sink=refuse))


def test_corruption_in_transit_is_detected(transport, monkeypatch):
    monkeypatch.setenv("TANDEM_FAULTS", "transfer.corrupt=1")
    active_faults.cache_clear()
    try:
        with pytest.raises(TransferCorrupted, match="checksum"):
            asyncio.run(exchange(transport, kv_of(20)))
    finally:
        monkeypatch.delenv("TANDEM_FAULTS")
        active_faults.cache_clear()


def test_unreachable_receiver_is_retryable(transport):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransferUnavailable) as err:
        asyncio.run(exchange(transport, kv_of(5), address=f"127.0.0.1:{port}"))
    assert err.value.retryable


@pytest.mark.parametrize("messages", [
    [b"\x12\x03abc"],  # payload before any handoff
    ["handoff", b"\x0a\x01x"],  # a second handoff where payload belongs
    ["handoff", b"\x12\x09abc"],  # a payload chunk shorter than its length says
])
def test_grpc_receiver_refuses_malformed_streams(messages):
    import grpc

    from tandem.kv_store.kv_object import encode_kv
    from tandem.proto.v1 import kv_transfer_pb2 as pb
    from tandem.transfer.grpc_transport import PUSH_KV

    header, _ = encode_kv(kv_of(5), "model-a")
    handoff = pb.KVChunk(handoff=pb.Handoff(request_id="r1", kv_header=header.encode(),
                                            output_token_ids=[7])).SerializeToString()
    wire = [handoff if m == "handoff" else m for m in messages]

    async def sink(handoff, kv):
        raise AssertionError("malformed KV reached the sink")

    async def main():
        receiver = make_transport("grpc")
        address = await receiver.start_receiver("127.0.0.1", IDENTITY, sink)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                push = channel.stream_unary(PUSH_KV)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await push(iter(wire), timeout=10)
                return err.value.code()
        finally:
            await receiver.close()

    assert asyncio.run(main()) == grpc.StatusCode.INVALID_ARGUMENT
