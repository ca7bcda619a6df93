"""Attention offload through a real cluster: 1 prefill, 1 decode and 4 attention workers (Ray
actors on the tandem_memory resource), fp32, tiny KV budgets (8-token blocks, 7 blocks a
worker) so sequences split, spill and fill the decode worker. Greedy output with offload is
identical to one engine's; the decode worker holds no block for offloaded sequences; the
attention workers' byte counters move; an attention worker killed mid-decode costs nothing but
a resume."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

from tandem.client import Client

from .conftest import greedy, run_to_completion, serve_config

pytestmark = pytest.mark.slow

BLOCKS = 7  # per worker: 56 tokens; the decode worker holds N = 2 requests of 24 tokens
NEW = 16
CHANNEL_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    from .serving import ServerThread, tandem_faults

    config = serve_config(
        attention_workers=4,
        # Layer by layer: each piece is cut at the ranges' boundaries as it is computed.
        worker={"engine": {"block_size": 8}, "kv_store": {"enabled": False},
                "kv_streaming": "layerwise",
                "offload": {"mode": "auto", "min_tokens": 40, "attention_kv_blocks": BLOCKS,
                            "decode_kv_blocks": BLOCKS,
                            "channel_timeout_s": CHANNEL_TIMEOUT_S}})
    with tandem_faults("step.delay=0.05"):  # slower steps: each look lands mid-stream
        running = ServerThread(config)
    yield running
    running.close()


def prompt(length: int, seed: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 40000 + 100 for i in range(length)]


def decode_stats(cluster):
    return ray.get(cluster.server.decode_workers[0].stats.remote(), timeout=30)


def attention_stats(cluster) -> list:
    return ray.get([a.stats.remote() for a in cluster.server.pools.attention_actors], timeout=30)


def stream(cluster, tokens: list[int], on_token=None) -> list[int]:
    got: list[int] = []
    with Client(cluster.address, timeout=300) as client:
        for chunk in client.stream(tokens, max_tokens=NEW, temperature=0, ignore_eos=True):
            got.extend(chunk.token_ids)
            if on_token is not None and chunk.token_ids:
                on_token(len(got))
            if chunk.finish_reason:
                break
    return got


def wait_attention_idle(cluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while any(s.engine.num_free_blocks < s.engine.num_blocks for s in attention_stats(cluster)):
        assert time.monotonic() < deadline, "attention workers still hold KV"
        time.sleep(0.2)


@pytest.mark.parametrize(("case", "length", "holders"), [
    ("one attention worker", 40, 1),
    ("split over three", 120, 3),
    ("spills mid-generation", 110, 3),  # 7 + 7 blocks, the tail's last block has 2 slots
])
def test_offloaded_greedy_output_is_identical_to_local(cluster, make_engine, case, length,
                                                       holders):
    wait_attention_idle(cluster)
    tokens = prompt(length, length)
    want = run_to_completion(make_engine(block_size=8), [tokens], greedy(NEW))[0]
    before = decode_stats(cluster).offload
    seen: dict[str, object] = {}

    def look(n: int) -> None:
        if n == 6 and not seen:  # after the spill (2 slots left), before the end
            seen["decode"] = decode_stats(cluster)
            seen["attention"] = attention_stats(cluster)

    assert stream(cluster, tokens, look) == want
    d = seen["decode"]
    assert d.engine.num_free_blocks == d.engine.num_blocks  # no block here for it
    assert d.offload.num_offloaded == 1
    holding = [s for s in seen["attention"] if s.engine.num_running]
    assert len(holding) == holders
    after = decode_stats(cluster).offload
    assert sum(h.bytes_sent for h in after.holders.values()) > \
        sum(h.bytes_sent for h in before.holders.values())
    assert all(s.attention.channel.bytes_in > 0 for s in holding)


def test_a_batch_mixes_local_and_offloaded_requests(cluster, make_engine):
    wait_attention_idle(cluster)
    short, long_ = prompt(8, 1), prompt(40, 2)  # 24 tokens stay local; 56 reach min_tokens
    want = run_to_completion(make_engine(block_size=8), [short, long_], greedy(NEW))
    before = sum(h.bytes_received for h in decode_stats(cluster).offload.holders.values())
    seen = {}
    gate = threading.Event()

    def look(n: int) -> None:
        if n == 4 and "decode" not in seen:
            seen["decode"] = decode_stats(cluster)
        gate.set()

    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(stream, cluster, long_, look)
        gate.wait(120)
        fast = pool.submit(stream, cluster, short)
        got = [fast.result(), slow.result()]
    assert got == want
    d = seen["decode"]
    assert d.offload.num_offloaded == 1
    # Only the local request's blocks are held there (24 tokens: 3 blocks at most).
    assert d.engine.num_blocks - d.engine.num_free_blocks <= 3
    assert sum(h.bytes_received for h in d.offload.holders.values()) > before


def test_the_attention_pool_multiplies_the_requests_served_at_once(cluster, make_engine):
    """The decode worker's own budget holds N = 2 of these requests whole; with four
    attention workers of the same budget, 10 >= 4N run at once, each correct, none queued."""
    wait_attention_idle(cluster)
    prompts = [prompt(8, 100 + i) for i in range(10)]
    want = run_to_completion(make_engine(block_size=8), prompts, greedy(NEW))
    router = cluster.server.router
    offloaded = router.num_offloaded
    preemptions = decode_stats(cluster).engine.num_preemptions
    waits = router.num_capacity_waits
    with ThreadPoolExecutor(10) as pool:
        got = list(pool.map(lambda p: stream(cluster, p), prompts))
    assert got == want
    assert router.num_offloaded - offloaded == 8  # 2 whole on the decode worker, 8 away
    assert decode_stats(cluster).engine.num_preemptions == preemptions
    assert router.num_capacity_waits == waits  # none waited for room


def test_offload_shows_in_the_admin_status_and_metrics(cluster):
    import urllib.request

    from tandem.cluster.admin import status_of

    wait_attention_idle(cluster)
    seen = {}

    def look(n: int) -> None:
        if n == 6 and not seen:
            cluster.run(cluster.server.monitor.refresh())
            seen["status"] = status_of("m", cluster.server.monitor, cluster.server.router)

    stream(cluster, prompt(40, 77), look)
    workers = {w.id.split("@")[0]: w for w in seen["status"].workers}
    decode = workers["decode-0"].offload
    assert decode.offloaded_sequences == 1 and decode.steps > 0
    assert decode.bytes_sent_per_step > 0 and decode.bytes_received_per_step > 0
    assert decode.layer_round_trip_s > 0 and 0 <= decode.pipeline_overlap <= 1
    holding = [w for w in seen["status"].workers if w.role == "attention"
               and w.offload.kv_held_bytes > 0]
    assert len(holding) == 1 and holding[0].offload.bytes_in > 0
    text = urllib.request.urlopen(f"{cluster.http_url}/metrics", timeout=10).read().decode()
    sent = [line for line in text.splitlines()
            if line.startswith("tandem:attention_channel_bytes_total")
            and 'direction="to_attention"' in line]
    assert sent and float(sent[0].split()[-1]) > 0
    assert "tandem:attention_offloaded_requests_total" in text


def test_an_attention_worker_lost_mid_decode_resumes_its_sequence(cluster, make_engine):
    wait_attention_idle(cluster)
    tokens = prompt(40, 9)
    want = run_to_completion(make_engine(block_size=8), [tokens], greedy(NEW))[0]
    resumed = cluster.server.router.num_resumed
    killed = []

    def kill(n: int) -> None:
        if n == 4 and not killed:
            stats = attention_stats(cluster)
            slot = next(i for i, s in enumerate(stats) if s.engine.num_running)
            actor = cluster.server.pools.attention_actors[slot]
            killed.append(slot)
            ray.kill(actor, no_restart=True)

    started = time.monotonic()
    assert stream(cluster, tokens, kill) == want
    assert killed and cluster.server.router.num_resumed == resumed + 1
    # Nothing waited past a deadline: the loss was seen at once (a closed stream), not after
    # the channel's deadline, let alone the request's.
    assert time.monotonic() - started < 120
