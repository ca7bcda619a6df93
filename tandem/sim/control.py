"""The autoscaler's policy in the simulated loop: every `interval_s` it builds the same metrics
window the gateway exports, runs `decide`, and starts or drains replicas through the engine."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from tandem.cluster.autoscaler import (
    ROLES,
    WINDOW,
    Decision,
    LoadSample,
    PolicyMemory,
    decide,
)
from tandem.cluster.profile import ReplicaProfile
from tandem.sim.config import SimConfig
from tandem.sim.fleet import Fleet
from tandem.sim.result import Ledger, weighted_quantile
from tandem.sim.workload import Workload


class Engine(Protocol):
    fleet: Fleet

    def queue_depth(self) -> dict[str, int]: ...
    def kv_use(self) -> float: ...
    def start_replica(self, role: str, now: float) -> None: ...
    def drain_replica(self, role: str, now: float) -> None: ...


class Controller:
    def __init__(self, config: SimConfig, profile: ReplicaProfile, workload: Workload,
                 ledger: Ledger) -> None:
        self.config = config
        self.profile = profile
        self.workload = workload
        self.ledger = ledger
        self.window: list[LoadSample] = []
        self.memory = PolicyMemory()
        self.decisions: list[tuple[float, dict[str, int], dict[str, str]]] = []
        self._seen = 0  # ledger parts already read

    def tick(self, engine: Engine, now: float) -> Decision:
        interval = self.config.autoscale.interval_s
        self.window = [*self.window[-(WINDOW - 1):], self._sample(engine, now, interval)]
        fleet = engine.fleet
        colocated = self.config.layout == "colocated"
        state = {role: fleet.state(role, now) for role in ROLES}
        if colocated:  # the policy sizes prefill and decode; colocated replicas do both
            state["prefill"] = type(state["decode"])(0)
        decision, self.memory = decide(self.window, self.profile, self.config.slo,
                                       self.config.autoscale, self.config.pools, state, now,
                                       self.memory, colocated=colocated)
        desired = dict(decision.desired)
        if not self.config.offload:
            desired["attention"] = fleet.counts("attention", now)[0]
        for role in ROLES:
            for _ in range(decision.give_up.get(role, 0)):
                engine.drain_replica(role, now)
            ready, pending, _ = fleet.counts(role, now)
            for _ in range(desired[role] - ready - pending):
                engine.start_replica(role, now)
            for _ in range(ready + pending - desired[role]):
                engine.drain_replica(role, now)
        self.decisions.append((now, desired, decision.reasons))
        return decision

    def _sample(self, engine: Engine, now: float, interval: float) -> LoadSample:
        arrival = self.workload.arrival_s
        lo, hi = np.searchsorted(arrival, [now - interval, now], side="right")
        new = self.ledger.since(self._seen)  # the units finished since the last tick
        self._seen = self.ledger.parts()
        ttft = itl = None
        if new["weight"].size:
            mid = (new["first_lo"] + new["first_hi"]) / 2
            q = self.config.slo.percentile / 100
            ttft = weighted_quantile(mid - new["arrival"], new["weight"], q)
            out = new["output"]
            per_token = np.where(out > 1, (new["finish"] - mid) / np.maximum(out - 1, 1), 0.0)
            itl = weighted_quantile(per_token, new["weight"], q)
        return LoadSample(
            at=now, arrival_rate=(hi - lo) / interval,
            prompt_tokens_rate=float(self.workload.prompt[lo:hi].sum()) / interval,
            output_tokens_rate=float(self.workload.output[lo:hi].sum()) / interval,
            queue_depth=engine.queue_depth(), ttft_s=ttft, itl_s=itl, kv_use=engine.kv_use())

