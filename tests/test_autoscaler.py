"""The autoscaling policy on recorded metric windows: it scales up on a burst and down after
its window, respects bounds, does not flap on noise, counts pending replicas as no capacity
and gives them up after the timeout, and scales to and from zero. The module is pure: it
imports neither Ray nor torch."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest

from tandem.cluster.autoscaler import (
    AutoscaleConfig,
    LoadSample,
    PolicyMemory,
    PoolBounds,
    PoolsConfig,
    PoolState,
    SLOConfig,
    decide,
)
from tandem.cluster.profile import DecodePoint, PrefillPoint, ReplicaProfile

PROFILE = ReplicaProfile(
    model="test", device="cpu",
    prefill=[PrefillPoint(prompt_tokens=128, tokens_per_s=2000),
             PrefillPoint(prompt_tokens=4096, tokens_per_s=4000)],
    # 10 ms + 1 ms per sequence: at ITL 50 ms, batch 40 -> 800 output tok/s a replica
    decode=[DecodePoint(batch=b, context=1024, step_s=0.010 + 0.001 * b) for b in (1, 64)],
    kv_capacity_tokens=200_000)
SLO = SLOConfig(ttft_s=2.0, itl_s=0.05)
CONFIG = AutoscaleConfig(interval_s=10, scale_up_window_s=20, scale_down_window_s=60,
                         scale_down_step=1.0, headroom=1.0)
POOLS = PoolsConfig(prefill=PoolBounds(min=1, max=10), decode=PoolBounds(min=1, max=10))


def sample(at: float, rate: float, isl: float = 1000, osl: float = 100, **extra) -> LoadSample:
    return LoadSample(at, rate, rate * isl, rate * osl, **extra)


def run(rates: list[float], state: dict[str, int] | None = None, config=CONFIG, pools=POOLS,
        **extra) -> list[dict[str, int]]:
    """Call the policy every interval over `rates`, applying each decision at once (every
    replica ready); the decisions."""
    ready = dict(state or {"prefill": 1, "decode": 1, "attention": 0})
    memory, out = PolicyMemory(), []
    for i, rate in enumerate(rates):
        now = i * config.interval_s
        decision, memory = decide([sample(now, rate, **extra)], PROFILE, SLO, config, pools,
                                  {r: PoolState(n) for r, n in ready.items()}, now, memory)
        ready = dict(decision.desired)
        out.append(decision.desired)
    return out


def test_throughput_sizing_follows_the_profile():
    decision, _ = decide([sample(0, 8.0)], PROFILE, SLO, CONFIG, POOLS,
                         {"prefill": PoolState(1), "decode": PoolState(1)}, 0)
    # 8,000 prompt tok/s at ISL 1,000 (2,440 tok/s a replica, interpolated) -> 4;
    # 800 output tok/s / 800 a replica (batch 40 at 50 ms) -> 1
    assert decision.desired == {"prefill": 4, "decode": 1, "attention": 0}
    assert "prompt tok/s" in decision.reasons["prefill"]


def test_a_burst_scales_up_and_the_pools_come_back_down_after_the_window():
    decisions = run([2] * 3 + [20] * 4 + [2] * 10)
    decode = [d["decode"] for d in decisions]
    assert decode[:3] == [1, 1, 1]
    assert max(decode[3:7]) >= 3  # the burst: up within the scale-up window (20 s)
    burst_peak = max(decode)
    after = decode[7:]
    assert after[:5] == [burst_peak] * 5  # held for the scale-down window (60 s)...
    assert after[-1] == 1  # ...then down


def test_bounds_hold_whatever_the_load():
    pools = PoolsConfig(prefill=PoolBounds(min=2, max=3), decode=PoolBounds(min=1, max=2))
    decisions = run([0] * 3 + [100] * 5, pools=pools)
    assert all(2 <= d["prefill"] <= 3 and 1 <= d["decode"] <= 2 for d in decisions)
    assert decisions[-1] == {"prefill": 3, "decode": 2, "attention": 0}
    with pytest.raises(ValueError, match=r"min \(3\) exceeds max \(1\)"):
        PoolBounds(min=3, max=1)


def test_noise_does_not_make_the_pools_flap():
    noisy = [4, 9, 3, 10, 4, 9, 3, 10, 4, 9, 3, 10]  # one-interval spikes
    decisions = run(noisy)
    prefill = [d["prefill"] for d in decisions]
    changes = sum(1 for a, b in itertools.pairwise(prefill) if a != b)
    assert changes <= 2


def test_pending_replicas_count_as_no_capacity_and_are_given_up_after_the_timeout():
    config = AutoscaleConfig(interval_s=10, scale_up_window_s=0, scale_down_window_s=0,
                             pending_timeout_s=60)
    load = [sample(100, 20.0)]
    state = {"prefill": PoolState(1, pending_since=(50,)), "decode": PoolState(1)}
    decision, memory = decide(load, PROFILE, SLO, config, POOLS, state, 100)
    assert decision.desired["prefill"] >= 2 and not decision.give_up
    # Still pending 70 s after its start: given up, and not counted.
    stuck = {"prefill": PoolState(1, pending_since=(30,)), "decode": PoolState(1)}
    decision, _ = decide(load, PROFILE, SLO, config, POOLS, stuck, 100, memory)
    assert decision.give_up == {"prefill": 1}
    assert decision.desired["prefill"] == decide(load, PROFILE, SLO, config, POOLS,
                                                 {"prefill": PoolState(1),
                                                  "decode": PoolState(1)}, 100)[0] \
        .desired["prefill"]


def test_a_pool_scales_to_zero_when_idle_and_back_at_once_for_queued_requests():
    pools = PoolsConfig(prefill=PoolBounds(min=0, max=4), decode=PoolBounds(min=0, max=4))
    decisions = run([1] + [0] * 8, pools=pools)
    assert decisions[-1]["prefill"] == 0 and decisions[-1]["decode"] == 0
    zero = {"prefill": PoolState(0), "decode": PoolState(0)}
    queued = LoadSample(200, 0.0, 0.0, 0.0, queue_depth={"prefill": 3})
    decision, _ = decide([queued], PROFILE, SLO, CONFIG, pools, zero, 200)
    assert decision.desired["prefill"] == 1  # no waiting out a window with requests queued
    assert "queued with no replica" in decision.reasons["prefill"]


def test_the_kv_guard_adds_a_decode_replica():
    decision, _ = decide([sample(0, 1.0, kv_use=0.95)], PROFILE, SLO, CONFIG, POOLS,
                         {"prefill": PoolState(1), "decode": PoolState(2)}, 0)
    assert decision.desired["decode"] == 3 and "KV use 0.95" in decision.reasons["decode"]


def test_the_policy_module_imports_neither_ray_nor_torch():
    code = ("import sys, tandem.cluster.autoscaler, tandem.cluster.profile; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_a_policy_that_has_just_started_waits_a_window_before_scaling_down():
    config = AutoscaleConfig(interval_s=10, scale_up_window_s=0, scale_down_window_s=30,
                             scale_down_step=1.0)
    state = {"prefill": PoolState(6), "decode": PoolState(6)}
    memory, sizes = PolicyMemory(), []
    for i in range(6):
        decision, memory = decide([sample(i * 10, 1.0)], PROFILE, SLO, config, POOLS, state,
                                  i * 10, memory)
        sizes.append(decision.desired["prefill"])
    assert sizes[:4] == [6, 6, 6, 6] and sizes[-1] == 1  # held for 30 s, then down


def test_a_backlog_is_sized_by_the_work_it_holds():
    state = {"prefill": PoolState(3), "decode": PoolState(1)}
    pools = PoolsConfig(prefill=PoolBounds(min=1, max=100), decode=PoolBounds(min=1, max=10))
    per_replica = PROFILE.prefill_tokens_per_s(1000)
    for queued in (13, 500, 2000):
        decision, _ = decide([sample(0, 0.1, queue_depth={"prefill": queued})], PROFILE, SLO,
                             AutoscaleConfig(), pools, state, 0)
        # one replica for the arrivals, plus those that clear the queued prompts by the time
        # they have started (one 10 s interval + the profile's 60 s start-up)
        clears = math.ceil(queued * 1000 / per_replica / (10 + PROFILE.startup_s))
        assert decision.desired["prefill"] == max(1 + clears, 4), queued
        assert "guard" in decision.reasons["prefill"]
    calm, _ = decide([sample(0, 0.1, queue_depth={"prefill": 12})], PROFILE, SLO,
                     AutoscaleConfig(), pools, state, 0)
    assert "guard" not in calm.reasons["prefill"]  # 4 a replica is within the threshold


def test_a_scale_down_gives_back_at_most_its_step_an_interval():
    config = AutoscaleConfig(interval_s=10, scale_down_window_s=0, scale_down_step=0.05)
    pools = PoolsConfig(prefill=PoolBounds(min=1, max=200), decode=PoolBounds(min=1, max=200))
    ready, memory, sizes = 100, PolicyMemory(), []
    for i in range(5):
        state = {"prefill": PoolState(ready), "decode": PoolState(1)}
        decision, memory = decide([sample(i * 10, 0.1)], PROFILE, SLO, config, pools, state,
                                  i * 10, memory)
        ready = decision.desired["prefill"]
        sizes.append(ready)
    # held at first (the size it found counts for the window), then 5% (rounded down) each interval
    assert sizes == [100, 95, 91, 87, 83]
    small = run([0.1] * 5, {"prefill": 5, "decode": 1, "attention": 0},
                config=config.model_copy(update={"scale_down_step": 0.02}))
    assert [d["prefill"] for d in small] == [5, 4, 3, 2, 1]  # at least one replica a step


def test_a_colocated_pool_is_sized_for_both_phases_and_holds_steady_under_steady_load():
    pools = PoolsConfig(prefill=PoolBounds(min=1, max=100), decode=PoolBounds(min=1, max=100))
    separate, _ = decide([sample(0, 10.0)], PROFILE, SLO, AutoscaleConfig(), pools,
                         {"prefill": PoolState(1), "decode": PoolState(1)}, 0)
    ready, memory, sizes = 1, PolicyMemory(), []
    for i in range(20):  # each decision applied at once, the load unchanged
        decision, memory = decide([sample(i * 10, 10.0)], PROFILE, SLO, AutoscaleConfig(),
                                  pools, {"decode": PoolState(ready)}, i * 10, memory,
                                  colocated=True)
        assert decision.desired["prefill"] == 0
        ready = decision.desired["decode"]
        sizes.append(ready)
    both = separate.desired["prefill"] + separate.desired["decode"]
    assert sizes[-1] == both and set(sizes[1:]) == {both}  # no runaway
