"""Layer-wise KV streaming from a real prefill: each block of each layer is posted once, when it
is full; over real transports the first layer reaches the receiver while later layers are still
being computed, and the blocks land byte-identical."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.kv_cache import KVCache
from tandem.prefill_worker.streamer import LayerStreamer
from tandem.transfer import TRANSPORTS, make_transport
from tandem.transfer.base import Handoff, KVIdentity, KVTarget, SendSession

from .conftest import greedy, require_nixl
from .test_transfer import Sink


class RecordingSession(SendSession):
    def __init__(self) -> None:
        self.posts: list[tuple[range, int, list[int]]] = []

    def post(self, layers: range, first_block: int, src_blocks: list[int]) -> None:
        self.posts.append((layers, first_block, list(src_blocks)))

    async def finish(self, handoff: Handoff, timeout: float) -> None:
        return None

    async def abort(self) -> None:
        return None


def test_each_block_of_each_layer_is_posted_once_when_full(make_engine):
    engine = make_engine(max_num_batched_tokens=64, enable_prefix_caching=False)
    session = RecordingSession()
    prompt = list(range(1000, 1100))  # 100 tokens: chunks end at 64 and 100; blocks of 16
    streamer = LayerStreamer(engine, "r", len(prompt), session)
    engine.add_request("r", prompt, greedy(1), prefill_only=True, on_layer_kv=streamer)
    while not engine.step():
        pass
    streamer.post_rest()
    table = engine.block_table("r")
    layers = engine.kv_spec.num_layers
    assert len(session.posts) == 2 * layers  # one post per layer per chunk, nothing left over
    for layer in range(layers):
        first, second = [p for p in session.posts if p[0] == range(layer, layer + 1)]
        assert first[1:] == (0, table[0:4])  # 64 tokens: blocks 0-3 are full
        assert second[1:] == (4, table[4:7])  # the rest, tail block included


def test_without_streaming_everything_goes_in_one_piece(make_engine):
    engine = make_engine()
    session = RecordingSession()
    prompt = list(range(1000, 1040))
    streamer = LayerStreamer(engine, "r", len(prompt), session)
    engine.add_request("r", prompt, greedy(1), prefill_only=True)
    engine.step()
    streamer.post_rest()
    assert session.posts == [(range(engine.kv_spec.num_layers), 0, engine.block_table("r"))]


@pytest.mark.parametrize("name", TRANSPORTS)
def test_first_layer_arrives_before_the_last_layer_is_computed(make_engine, name):
    if name == "nixl":
        require_nixl()
    engine = make_engine()
    spec = engine.kv_spec
    prompt = list(range(2000, 2400))
    n_blocks = spec.num_blocks_for(len(prompt))
    dst_blocks = list(range(3, 3 + n_blocks))
    sink = Sink({"r": dst_blocks})
    computed: dict[int, float] = {}

    async def main():
        dst = KVCache(spec, n_blocks + 8, torch.device("cpu"))
        receiving, sending = make_transport(name), make_transport(name)
        runner = AsyncEngine(engine)
        try:
            info = await receiving.start_receiver(
                "127.0.0.1", KVIdentity(engine.fingerprint, spec, engine.max_model_len), dst, sink)
            receiving.admit(sending.introduction())  # the prefill worker does it through Ray
            session = sending.open_session(engine.cache, engine.fingerprint,
                                           KVTarget(info, tuple(dst_blocks), len(prompt)), "r")
            streamer = LayerStreamer(engine, "r", len(prompt), session)

            def on_layer(layer, first_position, keys, values):
                streamer(layer, first_position, keys, values)
                computed[layer] = time.monotonic()

            stream = runner.open_stream("r")
            await runner.call(lambda e: e.add_request("r", prompt, greedy(1), prefill_only=True,
                                                      on_layer_kv=on_layer))
            out = await stream.get()
            await runner.call(lambda e: streamer.post_rest())
            await session.finish(Handoff("r", out.token_ids), timeout=30)
            return dst
        finally:
            await runner.close()
            await sending.close()
            await receiving.close()

    dst = asyncio.run(main())
    assert sink.completed and len(sink.arrivals) == spec.num_layers
    first_arrival = min(t for t, layers in sink.arrivals if 0 in layers)
    assert first_arrival < computed[spec.num_layers - 1]
    every = range(spec.num_layers)
    assert torch.equal(dst.gather(every, dst_blocks).view(torch.int32),
                       engine.cache.gather(every, engine.block_table("r")).view(torch.int32))
