"""Leases, event-driven admission and recovery from lost workers, on a real 2 prefill + 2 decode
cluster (fp32, NIXL handoffs where available, small KV pools so they fill up)."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
import ray

from tandem.client import Client, TandemError
from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.llm import LLM
from tandem.engine.sampling_params import SamplingParams

from .conftest import require_nixl, serve_config

pytestmark = pytest.mark.slow

LEASE_S = 5.0
STEP_DELAY = "step.delay=0.01"
MAX_QUEUED = 3
PROMPT = "Once upon a time, in a small village at the edge of a great forest,"


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    from .serving import ServerThread, tandem_faults

    config = serve_config(prefill_workers=2, decode_workers=2,
                          gateway={"max_queued_requests": MAX_QUEUED,
                                   "rebalance": {"interval_s": 0.5}},
                          worker={"lease_s": LEASE_S, "handoff_timeout_s": 5.0,
                                  "kv_store": {"enabled": False}})
    with tandem_faults(STEP_DELAY):  # slower steps: each fault lands mid-stream
        running = ServerThread(config)
    yield running
    running.close()


def decode_workers(cluster) -> list:
    return cluster.server.decode_workers


def wait_serving_idle(pools, timeout: float = 60) -> None:
    """Every ready decode worker holds no block (removed ones are not asked)."""
    deadline = time.monotonic() + timeout
    while any(s.engine.num_free_blocks < s.engine.num_blocks for s in ray.get(
            [w.actor.stats.remote() for w in pools.of("decode") if w.state == "ready"])):
        assert time.monotonic() < deadline, "decode workers still hold blocks"
        time.sleep(0.5)


def stream_with_event(cluster, llm, event, n: int = 100) -> tuple[list[int], list[int]]:
    """Stream a greedy request; after 8 tokens, call `event(worker)` with the decode worker
    (a PoolWorker) that holds the sequence at that moment. The tokens streamed, and what an
    undisturbed run gives."""
    want = llm.generate([PROMPT], SamplingParams(max_tokens=n, temperature=0,
                                                 ignore_eos=True))[0].token_ids
    got: list[int] = []
    fired = False
    with Client(cluster.address, timeout=300) as client:
        for chunk in client.stream(PROMPT, max_tokens=n, temperature=0, ignore_eos=True):
            got.extend(chunk.token_ids)
            if len(got) >= 8 and not fired:
                fired = True
                event(next(w for w in cluster.server.pools.of("decode") if w.state == "ready"
                           and ray.get(w.actor.stats.remote()).engine.num_running > 0))
            if chunk.finish_reason:
                break
    return got, want


@pytest.fixture(scope="module")
def llm(loaded_fp32) -> LLM:
    return LLM.from_engine(LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1),
                                     loaded=loaded_fp32))


def fill(worker, prefix: str, leave: int = 0) -> list[str]:
    """Reserve every free block of a decode worker but `leave`, directly, as a gateway would
    before a prefill; the ids of the reservations."""
    stats = ray.get(worker.stats.remote())
    ids, n = [], 0
    tokens = (stats.engine.num_free_blocks - leave) * 16
    while tokens >= 16:
        rid = f"{prefix}-{n}"
        ray.get(worker.reserve.remote(rid, list(range(1000, 999 + tokens)),
                                      SamplingParams(max_tokens=1)))
        ids.append(rid)
        n += 1
        tokens = (ray.get(worker.stats.remote()).engine.num_free_blocks - leave) * 16
    return ids


def test_an_unpolled_reservation_expires_and_its_blocks_come_back(cluster):
    worker = decode_workers(cluster)[0]
    fill(worker, "orphan")  # the gateway that reserved these never polls: it "died"
    assert ray.get(worker.stats.remote()).engine.num_free_blocks == 0
    deadline = time.monotonic() + LEASE_S * 4 + 40
    while ray.get(worker.stats.remote()).engine.num_free_blocks != \
            ray.get(worker.stats.remote()).engine.num_blocks:
        assert time.monotonic() < deadline, "the expired reservations kept their blocks"
        time.sleep(0.5)
    cluster.wait_idle(timeout=60)


def test_admission_is_a_bounded_queue_without_a_polling_storm(cluster):
    workers = decode_workers(cluster)
    for i, w in enumerate(workers):
        fill(w, f"full{i}")
    calls_before = [ray.get(w.stats.remote()).control_calls for w in workers]
    outcomes: list[str] = []

    def request(i: int) -> None:
        with Client(cluster.address, timeout=LEASE_S * 6) as client:
            try:
                out = client.generate(PROMPT, max_tokens=2, temperature=0)
                outcomes.append(out.finish_reason)
            except TandemError as e:
                outcomes.append(e.code().name)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(MAX_QUEUED + 2)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    time.sleep(3)  # the queue waits; only its head may ask the workers, about once a second
    calls_after = [ray.get(w.stats.remote()).control_calls for w in workers]
    for t in threads:
        t.join(LEASE_S * 8)
    # The excess was refused at once; the queued ones ran once the leases freed the blocks.
    assert outcomes.count("RESOURCE_EXHAUSTED") == 2
    assert sorted(o for o in outcomes if o != "RESOURCE_EXHAUSTED") == ["length"] * MAX_QUEUED
    for before, after in zip(calls_before, calls_after, strict=True):
        asked = sum(after.values()) - sum(before.values())
        # One stats call each per second of waiting (plus the monitor's every 2 s); polling
        # every 50 ms for each of the 3 queued requests would be ~200 in 3.6 s.
        assert asked < 30, (before, after)
    cluster.wait_idle(timeout=60)


def test_a_prefill_worker_lost_mid_prefill_is_retried_on_the_other(cluster, llm):
    prompt = " ".join(["The lighthouse keeper counted the ships that passed the rocks."] * 50)
    want = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
    router = cluster.server.router
    resumed_before = router.num_resumed
    result: dict = {}

    def request() -> None:
        with Client(cluster.address, timeout=300) as client:
            try:
                result["out"] = client.generate(prompt, max_tokens=4, temperature=0,
                                                request_id="lost-prefill")
            except TandemError as e:
                result["error"] = e

    thread = threading.Thread(target=request)
    thread.start()
    busy = None
    deadline = time.monotonic() + 60
    while busy is None:  # the prompt takes seconds to prefill: kill its worker meanwhile
        assert time.monotonic() < deadline and thread.is_alive(), f"never saw it: {result}"
        placed = router.active.get("lost-prefill")
        if placed is not None and placed.prefill is not None and \
                placed.prefill_task is not None and not placed.prefill_task.done():
            busy = placed.prefill
        time.sleep(0.02)
    ray.kill(busy, no_restart=True)
    thread.join(300)
    assert "error" not in result, result
    assert result["out"].token_ids == want
    assert router.num_resumed == resumed_before + 1


def test_a_lost_decode_worker_resumes_the_stream_identically(cluster, llm):
    router = cluster.server.router
    resumed_before = router.num_resumed
    got, want = stream_with_event(  # mid-stream: the worker holds the sequence now
        cluster, llm, lambda holder: ray.kill(holder.actor, no_restart=True), n=120)
    assert got == want
    assert router.num_resumed == resumed_before + 1


def test_a_dead_worker_is_restarted_in_its_slot_and_takes_handoffs_again(cluster, llm):
    pools = cluster.server.pools
    cluster.run(pools.check_health(), timeout=300)  # notices the previous test's kill
    if all(w.restarts == 0 for w in pools.of("decode")):  # nothing was dead: kill one now
        ray.kill(pools.of("decode")[0].actor, no_restart=True)
    deadline = time.monotonic() + 180
    while True:  # dead workers are restarted in their slots (as the background checks do)
        cluster.run(pools.check_health(), timeout=300)
        if all(w.state == "ready" for w in pools.of("decode")) and \
                any(w.restarts for w in pools.of("decode")):
            break
        assert time.monotonic() < deadline, [(w.id, w.state) for w in pools.of("decode")]
        time.sleep(0.5)
    restarts = [w.restarts for w in pools.of("decode")]
    assert max(restarts) == 1, restarts  # each killed slot restarted once
    ids = [w.id for w in pools.of("decode")]
    assert [i.split("@")[0] for i in ids] == ["decode-0", "decode-1"]  # stable slots
    want = llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
    restarted = next(w for w in pools.of("decode") if w.restarts)
    for i, w in enumerate(pools.of("decode")):
        if w is not restarted:
            fill(w.actor, f"others{i}")  # the request can only go to the restarted worker
    with Client(cluster.address, timeout=120) as client:
        assert client.generate(PROMPT, max_tokens=4, temperature=0).token_ids == want
    calls = ray.get(restarted.actor.stats.remote()).control_calls
    assert calls.get("reserve", 0) >= 1, calls  # a new KV receiver, introduced afresh
    # NIXL: the prefill workers know the serving decode workers' agents, none of the dead one.
    serving = {a for w in pools.of("decode") for a in w.info.kv_peer_ids}
    if not serving:
        require_nixl()  # skips only where NIXL is not installed
    for w in pools.of("prefill"):
        assert set(ray.get(w.actor.known_kv_peers.remote())) <= serving


def test_an_added_decode_worker_serves_and_a_removed_one_is_skipped(cluster, llm):
    pools = cluster.server.pools
    added = cluster.run(pools.add("decode"), timeout=300)
    assert added.id.startswith("decode-2")
    want = llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
    for i, w in enumerate(pools.of("decode")[:2]):
        fill(w.actor, f"busy{i}")  # only the added worker has room now
    with Client(cluster.address, timeout=120) as client:
        assert client.generate(PROMPT, max_tokens=4, temperature=0).token_ids == want
        assert ray.get(added.actor.stats.remote()).control_calls.get("reserve", 0) >= 1
        cluster.run(pools.remove(added.id))  # then the others, once their leases free them
        assert client.generate(PROMPT, max_tokens=4, temperature=0).token_ids == want
    assert pools.get(added.id).state == "removed"
    wait_serving_idle(pools)  # the leases free the others' blocks


def test_a_decode_worker_past_its_kv_high_water_mark_sheds_a_stream(cluster, llm):
    router, pools = cluster.server.router, cluster.server.pools
    migrated_before, resumed_before = router.num_migrated, router.num_resumed
    filled: dict = {}

    def fill_holder(holder) -> None:  # past the 0.9 mark, with room for the stream to grow
        filled[holder.actor] = fill(holder.actor, "highwater", leave=6)

    got, want = stream_with_event(cluster, llm, fill_holder)
    for actor, ids in filled.items():
        for rid in ids:
            ray.get(actor.abort.remote(rid))
    assert got == want
    assert router.num_migrated == migrated_before + 1  # moved with its KV, by the rebalancer
    assert router.num_resumed == resumed_before
    wait_serving_idle(pools)


def test_draining_a_decode_worker_moves_its_streams_and_kv_without_a_gap(cluster, llm):
    router = cluster.server.router
    resumed_before, migrated_before = router.num_resumed, router.num_migrated
    drained: dict = {}
    # Two more streams alongside, so the drain moves several at once (wherever they run).
    others = [f"{PROMPT} Chapter {i}." for i in (1, 2)]
    want_others = [o.token_ids for o in llm.generate(others, SamplingParams(
        max_tokens=150, temperature=0, ignore_eos=True))]
    got_others: dict[int, list[int]] = {}

    def other(i: int) -> None:
        with Client(cluster.address, timeout=300) as client:
            got_others[i] = client.generate(others[i], max_tokens=150, temperature=0,
                                            ignore_eos=True).token_ids

    threads = [threading.Thread(target=other, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()

    def drain(holder) -> None:
        drained["worker"] = holder
        drained["thread"] = threading.Thread(target=lambda: drained.update(
            reply=Client(cluster.address, timeout=300).drain(holder.id)))
        drained["thread"].start()

    got, want = stream_with_event(cluster, llm, drain)
    for t in [*threads, drained["thread"]]:
        t.join(120)
    assert got == want  # no token lost or repeated
    assert [got_others.get(i) for i in range(2)] == want_others
    moved = drained["reply"].moved_requests
    assert moved >= 1
    assert router.num_migrated == migrated_before + moved  # their KV moved: no re-prefill
    assert router.num_resumed == resumed_before
    assert drained["worker"].state == "removed" and drained["worker"].emptied


def test_sigterm_on_a_decode_worker_drains_it_and_moves_its_stream(cluster, llm):
    router, pools = cluster.server.router, cluster.server.pools
    cluster.run(pools.add("decode"), timeout=300)  # somewhere to move to
    migrated_before = router.num_migrated
    signalled = []

    def terminate(holder) -> None:
        signalled.append(holder)
        os.kill(holder.info.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not ray.get(holder.actor.stats.remote()).drain_requested:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cluster.run(pools.check_health())  # as the background checks do

    got, want = stream_with_event(cluster, llm, terminate)
    assert got == want
    assert router.num_migrated == migrated_before + 1
    holder, deadline = signalled[0], time.monotonic() + 60
    while holder.state != "removed":
        assert time.monotonic() < deadline, holder.state
        time.sleep(0.2)
    assert holder.emptied


def test_with_no_decode_worker_left_the_answer_is_unavailable(cluster):
    cluster.server.pools.restart_budget = 0  # no restarts: the pool stays empty
    for w in list(decode_workers(cluster)):
        ray.kill(w, no_restart=True)
    with Client(cluster.address, timeout=60) as client, \
            pytest.raises(TandemError) as caught:
        client.generate(PROMPT, max_tokens=2, temperature=0)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
