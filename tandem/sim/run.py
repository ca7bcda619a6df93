"""One entry point for both modes: `simulate(workload, profile, config, mode)`."""

from __future__ import annotations

import time
from typing import Literal

import numpy as np

from tandem.cluster.autoscaler import ROLES
from tandem.cluster.profile import ReplicaProfile
from tandem.sim.cohort import CohortEngine
from tandem.sim.cohorts import make_pieces
from tandem.sim.config import SimConfig
from tandem.sim.control import Controller
from tandem.sim.costs import Costs
from tandem.sim.fleet import Fleet
from tandem.sim.per_request import PerRequestEngine
from tandem.sim.result import (
    Ledger,
    SimResult,
    Timeline,
    attaining_share,
    summarise,
    weighted_quantile,
)
from tandem.sim.workload import Workload

Mode = Literal["request", "cohort"]
MAX_PIECE = 8  # requests per cohort piece


def simulate(workload: Workload, profile: ReplicaProfile, config: SimConfig,
             mode: Mode = "cohort", schedule: list[tuple[float, dict[str, int]]] | None = None,
             give_up_below: float | None = None) -> SimResult:
    """Run `workload` on the cluster `config` describes. With `schedule` (time, replicas per
    role) the pools follow it instead of the policy (the oracle's provisioning). With
    `give_up_below` (cohort mode) the run stops as soon as its SLO attainment can no longer
    reach that share (`aborted`; what was unfinished counts as failed): a search need not
    simulate an overloaded cluster's ever longer queues to the end."""
    started = time.perf_counter()
    costs = Costs(profile, config)
    fleet = Fleet(profile.startup_s, profile.price_per_hour)
    ledger = Ledger()
    if mode == "request":
        engine = PerRequestEngine(workload, costs, fleet, ledger, config)
    elif mode == "cohort":
        pieces = make_pieces(workload, config.cohort_s, MAX_PIECE, costs.kv_capacity,
                             costs.prefill_s, config.slice_s)
        engine = CohortEngine(pieces, costs, fleet, ledger, config)
    else:
        raise ValueError(f"mode must be 'request' or 'cohort', not {mode!r}")
    initial = {"prefill": 0 if config.layout == "colocated" else config.prefill,
               "decode": config.decode, "attention": config.attention if config.offload else 0}
    for role in ROLES:
        for _ in range(initial[role]):
            engine.start_replica(role, 0.0, warm=True)
    controller = (Controller(config, profile, workload, ledger)
                  if config.autoscale.enabled and schedule is None else None)
    timeline = Timeline()
    seen = [0]
    missed = [0.0, 0]  # requests known to miss the SLO, ledger parts counted

    def hopeless(eng: CohortEngine, now: float) -> bool:
        if give_up_below is None:
            return False
        new = ledger.since(missed[1])
        missed[1] = ledger.parts()
        if new["weight"].size:
            share = attaining_share(new["arrival"], new["first_lo"], new["first_hi"],
                                    new["finish"], new["output"], config.slo)
            missed[0] += float((new["weight"] * (1 - share)).sum())
        known = missed[0] + ledger.failed + eng.late(now, config.slo.ttft_s)
        return known > (1 - give_up_below) * len(workload)

    def on_tick(eng, now: float) -> None:
        if controller is not None:
            controller.tick(eng, now)
        elif schedule is not None:
            _follow(eng, schedule, now)

    def on_sample(eng, now: float) -> None:
        new = ledger.since(seen[0])
        seen[0] = ledger.parts()
        values: dict[str, float] = {}
        for role in ROLES:
            ready, pending, draining = fleet.counts(role, now)
            values[f"{role}_replicas"] = ready + draining
            values[f"{role}_pending"] = pending
            values[f"{role}_busy"] = eng.busy(role, now)
        if new["weight"].size:
            mid = (new["first_lo"] + new["first_hi"]) / 2
            values["ttft_p90"] = weighted_quantile(mid - new["arrival"], new["weight"], 0.9)
            out = new["output"]
            itl = np.where(out > 1, (new["finish"] - mid) / np.maximum(out - 1, 1), 0.0)
            values["itl_p90"] = weighted_quantile(itl, new["weight"], 0.9)
        timeline.add(now, **values)

    horizon = float(workload.arrival_s[-1]) + config.drain_s
    aborted = False
    if mode == "request":
        end = engine.run(horizon, on_tick, on_sample)
    else:
        end = _run_slices(engine, len(workload), horizon, config, on_tick, on_sample, hopeless)
        aborted = engine.accounted < len(workload) - 1e-6 and end < horizon
    engine.fail_unfinished()
    hours = {role: fleet.hours(role, end) for role in ROLES}
    result = summarise(ledger, len(workload), config.slo, hours, fleet.cost(end), end)
    result.wall_seconds = time.perf_counter() - started
    result.aborted = aborted
    result.timeline = timeline.columns
    result.decisions = controller.decisions if controller else []
    return result


def _run_slices(engine: CohortEngine, requests: int, horizon: float, config: SimConfig,
                on_tick, on_sample, hopeless) -> float:
    dt = config.slice_s
    tick_every = max(1, round(config.autoscale.interval_s / dt))
    sample_every = max(1, round(config.sample_s / dt))
    k = 0
    t = 0.0
    while t <= horizon:
        if k % tick_every == 0:
            if hopeless(engine, t):
                break
            on_tick(engine, t)
        if k % sample_every == 0:
            on_sample(engine, t)
        engine.advance(t)
        k += 1
        t = k * dt
        if engine.accounted >= requests - 1e-6:
            break
    return min(t, horizon)


def _follow(engine, schedule: list[tuple[float, dict[str, int]]], now: float) -> None:
    """Set the pools to the schedule's entry for `now`."""
    times = [at for at, _ in schedule]
    target = schedule[max(0, int(np.searchsorted(times, now, side="right")) - 1)][1]
    for role, want in target.items():
        ready, pending, _ = engine.fleet.counts(role, now)
        for _ in range(want - ready - pending):
            engine.start_replica(role, now)
        for _ in range(ready + pending - want):
            engine.drain_replica(role, now)
