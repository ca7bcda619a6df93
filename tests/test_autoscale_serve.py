"""`serve --autoscale` on a real Ray cluster (1 prefill, 1 to 2 decode workers), with
stabilisation windows of seconds: a load step adds a decode worker, and when the load stops
one is drained and removed; no request fails. The replica profile is written here, with a
decode replica that meets the ITL target at batch 1 only, so a few concurrent streams need a
second one."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tandem.client import Client

from .conftest import serve_config

pytestmark = pytest.mark.slow

PROFILE = {
    "version": 1, "model": "test", "device": "cpu:1",
    "prefill": [{"prompt_tokens": 16, "tokens_per_s": 2000.0}],
    # one sequence a step of 40 ms meets ITL 50 ms; two take 80 ms: 25 tok/s a replica
    "decode": [{"batch": 1, "context": 64, "step_s": 0.04},
               {"batch": 2, "context": 64, "step_s": 0.08}],
    "kv_capacity_tokens": 4096, "sources": {"all": "written by the test"}}


@pytest.fixture(scope="module")
def cluster(ray_cluster, tmp_path_factory):
    from .serving import ServerThread

    path = tmp_path_factory.mktemp("profile") / "profile.json"
    path.write_text(json.dumps(PROFILE))
    config = serve_config(
        autoscale={"enabled": True, "profile": str(path), "interval_s": 1.0,
                   "scale_up_window_s": 0.0, "scale_down_window_s": 4.0},
        pools={"prefill": {"min": 1, "max": 1}, "decode": {"min": 1, "max": 2}},
        slo={"ttft_s": 5.0, "itl_s": 0.05},
        worker={"kv_store": {"enabled": False}})
    running = ServerThread(config)
    yield running
    running.close()


def decode_ready(cluster) -> int:
    return sum(1 for w in cluster.server.pools.of("decode") if w.state == "ready")


def test_a_load_step_adds_a_decode_worker_and_one_is_drained_when_it_stops(cluster):
    stop, finished, failures = threading.Event(), [], []

    def load(seed: int) -> None:
        with Client(cluster.address, timeout=120) as client:
            n = 0
            while not stop.is_set():
                n += 1
                prompt = [(seed * 7919 + n * 31 + i * 104729) % 40000 + 100 for i in range(16)]
                try:
                    reply = client.generate(prompt, max_tokens=12, temperature=0,
                                            ignore_eos=True)
                    finished.append(reply.finish_reason)
                except Exception as e:  # counted, and the test fails on it
                    failures.append(repr(e))

    assert decode_ready(cluster) == 1
    threads = [threading.Thread(target=load, args=(s,), daemon=True) for s in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 180
    try:
        while decode_ready(cluster) < 2:
            assert time.monotonic() < deadline, "the load step added no decode worker"
            time.sleep(0.5)
        time.sleep(2.0)  # requests now run on both
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    decisions = cluster.server.metrics.autoscale.decisions
    assert decisions.get(("decode", "up"), 0) >= 1

    deadline = time.monotonic() + 120
    while not (decode_ready(cluster) == 1 and
               any(w.state == "removed" for w in cluster.server.pools.of("decode"))):
        assert time.monotonic() < deadline, "no decode worker was drained after the load"
        time.sleep(0.5)
    assert decisions.get(("decode", "down"), 0) >= 1
    assert not failures, failures
    assert finished and all(reason == "length" for reason in finished)
    assert cluster.server.autoscaler.last is not None
    assert "decode" in cluster.server.autoscaler.last.reasons


def test_autoscaling_needs_a_profile_and_keeps_a_worker_per_pool():
    with pytest.raises(ValueError, match="tandem profile"):
        serve_config(autoscale={"enabled": True})
    with pytest.raises(ValueError, match="scale to zero"):
        serve_config(autoscale={"enabled": True, "profile": "p.json"},
                     pools={"decode": {"min": 0, "max": 2}})
    with pytest.raises(ValueError, match=r"starting size 3 is outside \[1, 2\]"):
        serve_config(decode_workers=3, autoscale={"enabled": True, "profile": "p.json"},
                     pools={"decode": {"min": 1, "max": 2}})
