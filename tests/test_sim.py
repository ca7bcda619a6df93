"""The cluster simulator: every request finishes or is counted as failed, tokens are
conserved, a fixed trace and seed repeat exactly, and the per-request and cohort modes agree
on SLO attainment at 32 GPUs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tandem.cluster.profile import ReplicaProfile
from tandem.sim.config import SimConfig
from tandem.sim.run import simulate
from tandem.sim.workload import Workload, from_trace, replicate, synthetic

PROFILE = ReplicaProfile.load(
    Path(__file__).resolve().parents[1] / "tandem/sim/profiles/llama-3-8b-h200.json")


@pytest.fixture(scope="module")
def conv_32_gpus() -> Workload:
    """Two minutes of the conversation trace at 150 copies: 32 GPUs are not quite enough."""
    return from_trace("conv", copies=150, seed=1).window(0, 120)


def test_the_two_modes_agree_on_slo_attainment_at_32_gpus(conv_32_gpus):
    config = SimConfig(prefill=18, decode=14, drain_s=300)
    per_request = simulate(conv_32_gpus, PROFILE, config, "request")
    cohort = simulate(conv_32_gpus, PROFILE, config, "cohort")
    assert 0.05 < per_request.attainment < 0.95  # a load where the SLO is in question
    assert cohort.attainment == pytest.approx(per_request.attainment, rel=0.05)
    assert cohort.ttft_p90 == pytest.approx(per_request.ttft_p90, rel=0.25)
    assert cohort.itl_p50 == pytest.approx(per_request.itl_p50, rel=0.25)


@pytest.mark.parametrize("mode", ["request", "cohort"])
@pytest.mark.parametrize("layout", ["disaggregated", "colocated"])
def test_every_request_finishes_or_fails_and_tokens_are_conserved(mode, layout):
    load = from_trace("code", copies=100, seed=2).window(0, 20)
    # too few replicas and a short drain: some requests are still running at the horizon
    config = SimConfig(layout=layout, prefill=1, decode=1, drain_s=5.0)
    result = simulate(load, PROFILE, config, mode)
    assert result.failed > 0 and result.finished > 0
    assert result.finished + result.failed == pytest.approx(len(load))
    ledger_tokens = result.output_tokens + result.failed_tokens
    assert ledger_tokens == pytest.approx(float(load.output.sum()))


def test_a_fixed_trace_and_seed_repeat_exactly():
    runs = []
    for _ in range(2):
        load = from_trace("conv", copies=20, seed=7).window(0, 120)
        config = SimConfig(prefill=2, decode=1, drain_s=120, autoscale={"enabled": True})
        result = simulate(load, PROFILE, config, "cohort")
        runs.append(({k: v for k, v in result.summary().items() if k != "wall_s"},
                     result.decisions, result.timeline))
    assert runs[0] == runs[1]


def test_copies_keep_the_bursts_within_one_second():
    load = Workload(np.array([0.0, 10.0]), np.array([100, 200]), np.array([5, 6]))
    copied = replicate(load, 50, seed=3)
    assert len(copied) == 100 and int(copied.prompt.sum()) == 50 * 300
    first_burst = copied.arrival_s[copied.prompt == 100]
    assert first_burst.min() == 0.0 and first_burst.max() < 1.0


def test_the_policy_scales_a_pool_from_zero_and_requests_wait_for_it():
    load = synthetic(rate=5, duration_s=60, prompt=512, output=32, seed=4)
    config = SimConfig(prefill=0, decode=0, drain_s=300,
                       pools={"prefill": {"min": 0, "max": 8}, "decode": {"min": 0, "max": 8}},
                       autoscale={"enabled": True, "interval_s": 5})
    result = simulate(load, PROFILE, config, "cohort")
    assert result.failed == 0 and result.finished == len(load)
    assert result.ttft_p50 > PROFILE.startup_s * 0.5  # the first ones waited for a start-up
    assert max(result.timeline["prefill_pending"]) >= 1  # started from zero on demand


def test_the_policy_adds_decode_replicas_on_a_load_step():
    quiet = synthetic(rate=20, duration_s=300, prompt=512, output=400, seed=5)
    busy = synthetic(rate=400, duration_s=300, prompt=512, output=400, seed=6)
    load = Workload(np.r_[quiet.arrival_s, busy.arrival_s + 300],
                    np.r_[quiet.prompt, busy.prompt], np.r_[quiet.output, busy.output])
    config = SimConfig(prefill=1, decode=1, drain_s=300, autoscale={"enabled": True})
    result = simulate(load, PROFILE, config, "cohort")
    t = np.array(result.timeline["t"])
    decode = np.array(result.timeline["decode_replicas"])
    assert decode[t < 300].max() == 1 and decode[t > 450].max() > 1
    assert any("decode" in d and d["decode"] > 1 for _, d, _ in result.decisions)


def test_bad_input_is_refused_with_a_clear_error():
    load = synthetic(rate=1, duration_s=10, prompt=64, output=4)
    with pytest.raises(ValueError, match="mode"):
        simulate(load, PROFILE, SimConfig(), "exact")
    bare = PROFILE.model_copy(update={"attention_bytes_per_s": 0.0})
    with pytest.raises(ValueError, match="offload"):
        simulate(load, bare, SimConfig(offload=True, attention=1), "cohort")
    with pytest.raises(ValueError, match="transport"):
        simulate(load, PROFILE, SimConfig(transport="carrier-pigeon"), "cohort")
    with pytest.raises(ValueError, match="no request"):
        load.window(100, 200)


@pytest.mark.parametrize("mode", ["request", "cohort"])
def test_attention_offload_holds_the_kv_a_decode_replica_cannot(mode):
    """Long prompts on a decode replica that holds two of them: with an attention pool the
    rest decode with their KV offloaded instead of waiting, and the pool is paid for."""
    small = PROFILE.model_copy(update={"kv_capacity_tokens": 20_000})
    load = synthetic(rate=2, duration_s=60, prompt=8000, output=1000, seed=8)
    local = simulate(load, small, SimConfig(prefill=2, decode=1, drain_s=600), mode)
    offload = simulate(load, small, SimConfig(prefill=2, decode=1, attention=2, offload=True,
                                              drain_s=600), mode)
    assert offload.finished == local.finished == len(load)
    assert offload.attainment > local.attainment
    assert offload.itl_p90 < local.itl_p90
    assert offload.gpu_hours["attention"] > 0 and local.gpu_hours["attention"] == 0
