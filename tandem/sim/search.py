"""Provisioning baselines for the policy: the cheapest static pools that meet the SLO, and the
oracle (per-interval minimum provisioning with zero start-up time); and the policy's
stabilisation settings tuned to a load."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np

from tandem.cluster.profile import ReplicaProfile
from tandem.sim.config import SimConfig
from tandem.sim.result import SimResult
from tandem.sim.run import simulate
from tandem.sim.workload import Workload

TARGET = 0.99  # SLO attainment the baselines must reach
Report = Callable[[str], None]


def throughput_guess(workload: Workload, profile: ReplicaProfile, config: SimConfig,
                     quantile: float = 0.99) -> tuple[int, int]:
    """(prefill, decode) that carry the trace's busy minutes: a starting point."""
    minute = np.floor(workload.arrival_s / 60).astype(np.int64)
    prompt = np.bincount(minute, workload.prompt.astype(float)) / 60
    output = np.bincount(minute, workload.output.astype(float)) / 60
    isl = float(workload.prompt.mean())
    context = isl + float(workload.output.mean()) / 2
    _, decode_rate = profile.decode_capacity(context, config.slo.itl_s)
    prefill = math.ceil(np.quantile(prompt, quantile) / profile.prefill_tokens_per_s(isl))
    decode = math.ceil(np.quantile(output, quantile) / max(decode_rate, 1e-9))
    return max(prefill, 1), max(decode, 1)


def static_search(workload: Workload, profile: ReplicaProfile, config: SimConfig,
                  start: tuple[int, int] | None = None, grid: tuple[float, ...] = (0.8, 1.0, 1.25),
                  report: Report = print) -> tuple[tuple[int, int], SimResult]:
    """The cheapest (prefill, decode) that meets the SLO: every point of a coarse grid around
    `start`, then steps down to neighbours from the cheapest that met it."""
    base = start or throughput_guess(workload, profile, config)
    tried: dict[tuple[int, int], SimResult] = {}

    def attempt(point: tuple[int, int]) -> SimResult:
        if point not in tried:
            static = config.model_copy(update={"prefill": point[0], "decode": point[1],
                                               "autoscale": config.autoscale.model_copy(
                                                   update={"enabled": False})})
            tried[point] = simulate(workload, profile, static, "cohort", give_up_below=TARGET)
            r = tried[point]
            report(f"static P={point[0]} D={point[1]}: " + (
                f"below {TARGET} (stopped at {r.sim_seconds:.0f} s)" if r.aborted else
                f"attainment {r.attainment:.4f}, {r.total_gpu_hours:.1f} GPU-h"))
        return tried[point]

    for scale in (1.0, *(g for g in sorted(grid, reverse=True) if g != 1.0)):
        for fp in grid:
            for fd in grid:
                attempt((max(1, round(base[0] * fp * scale)), max(1, round(base[1] * fd * scale))))
        if any(r.attainment >= TARGET for r in tried.values()):
            break
    else:  # nothing on the grid met it: grow until something does
        point = max(tried, key=lambda p: tried[p].attainment)
        while attempt(point).attainment < TARGET:
            point = (math.ceil(point[0] * 1.25), math.ceil(point[1] * 1.25))
    best = min((p for p in tried if tried[p].attainment >= TARGET), key=lambda p: sum(p))
    step = (max(1, round(best[0] * 0.05)), max(1, round(best[1] * 0.05)))
    improved = True
    while improved:  # the neighbours: one step less of either pool
        improved = False
        for cand in ((best[0] - step[0], best[1]), (best[0], best[1] - step[1])):
            if min(cand) >= 1 and attempt(cand).attainment >= TARGET and sum(cand) < sum(best):
                best, improved = cand, True
                break
    return best, tried[best]


def oracle(workload: Workload, profile: ReplicaProfile, config: SimConfig,
           interval_s: float = 60.0, report: Report = print) -> SimResult:
    """Per interval, the provisioning the interval's own load needs (known in advance),
    started with no start-up time; scaled by the smallest factor whose run meets the SLO."""
    slots = np.floor(workload.arrival_s / interval_s).astype(np.int64)
    prompt = np.bincount(slots, workload.prompt.astype(float)) / interval_s
    output = np.bincount(slots, workload.output.astype(float)) / interval_s
    isl = float(workload.prompt.mean())
    context = isl + float(workload.output.mean()) / 2
    _, decode_rate = profile.decode_capacity(context, config.slo.itl_s)
    prefill_rate = profile.prefill_tokens_per_s(isl)
    instant = profile.model_copy(update={"startup_s": 0.0})

    def run(factor: float) -> SimResult:
        schedule = [(k * interval_s, {"prefill": max(1, math.ceil(factor * p / prefill_rate)),
                                      "decode": max(1, math.ceil(factor * d / decode_rate))})
                    for k, (p, d) in enumerate(zip(prompt, output, strict=True))]
        first = schedule[0][1]
        cfg = config.model_copy(update={"prefill": first["prefill"], "decode": first["decode"],
                                        "autoscale": config.autoscale.model_copy(
                                            update={"enabled": False})})
        result = simulate(workload, instant, cfg, "cohort", schedule=schedule,
                          give_up_below=TARGET)
        report(f"oracle x{factor:.3f}: " + (
            f"below {TARGET} (stopped at {result.sim_seconds:.0f} s)" if result.aborted else
            f"attainment {result.attainment:.4f}, {result.total_gpu_hours:.1f} GPU-h"))
        return result

    low, high = 1.0, 1.0
    best = run(high)
    while best.attainment < TARGET:
        low, high = high, high * 1.5
        best = run(high)
    for _ in range(4):  # bisect the factor
        mid = (low + high) / 2
        result = run(mid)
        if result.attainment >= TARGET:
            high, best = mid, result
        else:
            low = mid
    return best


# The stabilisation settings `tune_policy` tries: how long a pool holds its size through a
# lull, and how fast it then gives capacity back.
POLICY_GRID: dict[str, tuple[float, ...]] = {
    "scale_down_window_s": (60.0, 120.0, 300.0, 600.0),
    "scale_down_step": (0.02, 0.05, 1.0),
}


def tune_policy(workload: Workload, profile: ReplicaProfile, config: SimConfig,
                start: tuple[int, int], grid: dict[str, tuple[float, ...]] = POLICY_GRID,
                report: Report = print) -> tuple[SimConfig, SimResult]:
    """The policy's stabilisation for this load, as the simulator finds it: every point of
    `grid`, the policy taking over a cluster at `start`; the cheapest setting that meets the
    SLO, else the one closest to it. How bursty a trace is decides how long a pool must hold
    its size, and no one setting suits every trace."""
    keys = list(grid)
    runs: list[tuple[SimConfig, SimResult]] = []
    for values in itertools.product(*(grid[k] for k in keys)):
        update = dict(zip(keys, values, strict=True))
        cfg = config.model_copy(update={
            "prefill": start[0], "decode": start[1],
            "autoscale": config.autoscale.model_copy(update={"enabled": True, **update})})
        result = simulate(workload, profile, cfg, "cohort")
        report("policy " + ", ".join(f"{k} {v:g}" for k, v in update.items()) +
               f": attainment {result.attainment:.4f}, {result.total_gpu_hours:.1f} GPU-h")
        runs.append((cfg, result))
    meeting = [run for run in runs if run[1].attainment >= TARGET]
    if meeting:
        return min(meeting, key=lambda run: run[1].total_gpu_hours)
    return max(runs, key=lambda run: (run[1].attainment, -run[1].total_gpu_hours))
