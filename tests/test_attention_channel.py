"""The attention channel over real loopback TCP: an offloaded decode whose holders are
attention-worker channel servers gives the same greedy tokens as local decoding (fp32), the
byte counters match the frames a step must send (q to each holder, k/v to the tail, out and
lse back from each holder), and a bad frame or a silent holder fails within the deadline."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import torch

from tandem.attention_worker.channel_client import ChannelClient
from tandem.attention_worker.channel_server import ChannelServer
from tandem.attention_worker.range_kv import RangeKV
from tandem.attention_worker.wire import HEADER, Frame, Op
from tandem.engine.errors import KVHolderLost
from tandem.engine.offload import OffloadedSequence, offloaded_decode_step

from .conftest import greedy, run_to_completion
from .test_offload_step import PROMPTS, place, prefill


def serve(spec, num_blocks: int) -> tuple[RangeKV, ChannelServer]:
    kv = RangeKV(spec, num_blocks)
    return kv, ChannelServer(kv, threading.Lock(), "127.0.0.1")


def frame_bytes(frame: Frame) -> int:
    return sum(len(p) for p in frame.encode())


@pytest.mark.parametrize("micro_batches", [1, 2], ids=["one batch", "ping-pong"])
def test_offloaded_decode_over_the_channel_is_identical_and_counts_its_bytes(
        make_engine, micro_batches):
    n = 8
    want = run_to_completion(make_engine(), PROMPTS, greedy(n))
    engine = make_engine()
    spec, model = engine.kv_spec, engine.loaded.model
    firsts, kvs = zip(*(prefill(engine, p) for p in PROMPTS), strict=True)
    (kv_a, srv_a), (kv_b, srv_b) = serve(spec, 8), serve(spec, 8)
    place("s0", kvs[0], [kv_a, kv_b], [(0, 32), (32, 50)])  # split: b is its tail
    place("s1", kvs[1], [kv_b], [(0, 30)])
    a, b = ChannelClient(srv_a.address, "a", 10.0), ChannelClient(srv_b.address, "b", 10.0)
    seqs = [OffloadedSequence("s0", [a, b]), OffloadedSequence("s1", [b])]
    tokens = [[t] for t in firsts]
    cfg = model.config
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    for step in range(n - 1):
        sent_a, got_a = a.stats.bytes_sent, a.stats.bytes_received
        sent_b, got_b = b.stats.bytes_sent, b.stats.bytes_received
        out = offloaded_decode_step(model, seqs, [t[-1] for t in tokens],
                                    [50 + step, 30 + step], micro_batches)
        assert not out.lost
        for row, token in enumerate(out.logits.argmax(dim=-1).tolist()):
            tokens[row].append(token)
        # What one step must move, frame by frame, per layer (and one EXTEND per tail seq).
        halves = [["s0", "s1"]] if micro_batches == 1 else [["s0"], ["s1"]]
        q = [Frame(Op.ATTEND, 0, ids, struct.pack("<d", 1.0), [torch.zeros(len(ids), hq, d)])
             for ids in halves]
        kv_frames = [Frame(Op.APPEND, 0, ids, b"", [torch.zeros(len(ids), hkv, d)] * 2)
                     for ids in halves]
        back = [Frame(Op.RESULT, 0, [], b"", [torch.zeros(len(ids), hq, d),
                                                torch.zeros(len(ids), hq)]) for ids in halves]
        layers = cfg.num_layers
        a_ids = [["s0"]] if micro_batches == 2 else [["s0", "s1"]]  # a holds s0 only
        a_q = [Frame(Op.ATTEND, 0, ids, struct.pack("<d", 1.0), [torch.zeros(len(ids), hq, d)])
               for ids in a_ids]
        a_back = [Frame(Op.RESULT, 0, [], b"", [torch.zeros(len(ids), hq, d),
                                                  torch.zeros(len(ids), hq)]) for ids in a_ids]
        extend = sum(frame_bytes(Frame(Op.EXTEND, 0, [s])) + frame_bytes(Frame(Op.OK))
                     for s in ("s0", "s1"))
        assert a.stats.bytes_sent - sent_a == layers * sum(map(frame_bytes, a_q))
        assert a.stats.bytes_received - got_a == layers * sum(map(frame_bytes, a_back))
        assert b.stats.bytes_sent - sent_b + (b.stats.bytes_received - got_b) == extend + \
            layers * (sum(map(frame_bytes, q)) + sum(map(frame_bytes, kv_frames))
                      + sum(map(frame_bytes, back)))
    assert tokens == want
    assert srv_a.counters.bytes_in == a.stats.bytes_sent  # both ends agree
    assert srv_b.counters.bytes_out == b.stats.bytes_received
    for c in (a, b):
        c.close()
    srv_a.close()
    srv_b.close()


def test_a_frame_that_fails_its_checksum_is_refused(make_engine):
    kv, srv = serve(make_engine().kv_spec, 4)
    frame = Frame(Op.OPEN, 0, ["s"], struct.pack("<Q", 0))
    raw = bytearray(b"".join(frame.encode()))
    raw[-1] ^= 0xFF  # damage the payload
    host, port = srv.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(bytes(raw))
        sock.settimeout(5)
        assert sock.recv(HEADER.size) == b""  # the server drops the stream, answering nothing
    assert "s" not in kv.ranges
    srv.close()


def test_a_silent_attention_worker_fails_within_the_deadline():
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    client = ChannelClient(address, "silent", timeout_s=0.5)
    started = time.monotonic()
    reply = client.request_attend(0, ["s"], torch.zeros(1, 9, 64), 1.0)
    with pytest.raises(KVHolderLost, match=r"no reply in 0\.5 s"):
        reply.result()
    assert time.monotonic() - started < 5
    with pytest.raises(KVHolderLost):  # dead from then on: nothing waits again
        client.extend(["s"])
    listener.close()


def test_a_decode_worker_keeps_one_stream_per_attention_worker():
    """Requests starting at once share one stream: with two streams to one attention worker,
    a sequence's new k/v could be applied before another stream's q for it (tokens change)."""
    import asyncio
    from types import SimpleNamespace

    from tandem.decode_worker.offload import HolderAddress, OffloadedDecoding

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    worker = OffloadedDecoding()
    worker.config = SimpleNamespace(offload=SimpleNamespace(channel_timeout_s=5.0))
    worker._init_offload()

    async def connect_many():
        return await asyncio.gather(*(worker._channel(HolderAddress("a", address))
                                      for _ in range(6)))

    clients = asyncio.run(connect_many())
    assert all(c is clients[0] for c in clients)
    accepted = []
    with pytest.raises(TimeoutError):
        while True:
            accepted.append(listener.accept()[0])
    assert len(accepted) == 1
    clients[0].close()
    listener.close()
