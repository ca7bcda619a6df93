"""`tandem serve --autoscale`: the autoscaling policy applied to the Ray pools.

Every `autoscale.interval_s` it samples the gateway's metrics (`LoadWindow`), runs `decide`,
and acts through the pool manager, the one owner of workers: a scale-up starts actors (pending
until their model is loaded, given up after `pending_timeout_s`), a scale-down drains the
least busy worker (its streams migrate) and then stops it. Decisions are logged and exported
(`tandem:autoscale_*`). In a colocated cluster the policy's prefill and decode sizes add up to
the colocated pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tandem.cluster.autoscaler import (
    ROLES,
    WINDOW,
    Decision,
    PolicyMemory,
    PoolState,
    decide,
)
from tandem.cluster.config import ServeConfig
from tandem.cluster.load_window import LoadWindow, read_families
from tandem.cluster.metrics import ClusterMetrics
from tandem.cluster.pools import PoolManager
from tandem.cluster.profile import ReplicaProfile
from tandem.cluster.worker_status import WorkerMonitor

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    task: asyncio.Task
    started: float


class AutoscaleLoop:
    def __init__(self, config: ServeConfig, pools: PoolManager, monitor: WorkerMonitor,
                 metrics: ClusterMetrics, num_waiting: Callable[[], int],
                 profile: ReplicaProfile) -> None:
        self.config, self.pools, self.monitor, self.metrics = config, pools, monitor, metrics
        self.num_waiting, self.profile = num_waiting, profile
        self.window = LoadWindow(lambda: read_families(metrics.registry), config.slo.percentile)
        self.samples: list = []
        self.memory = PolicyMemory()
        self.pending: dict[str, list[_Pending]] = {role: [] for role in ROLES}
        self.draining: set[asyncio.Task] = set()
        self.last: Decision | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        logger.info("autoscaling every %.0f s (bounds: %s)", self.config.autoscale.interval_s,
                    ", ".join(f"{r} [{getattr(self.config.pools, r).min}, "
                              f"{getattr(self.config.pools, r).max}]" for r in self._roles()))

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self.draining) if t is not None]
        tasks += [p.task for pending in self.pending.values() for p in pending]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.autoscale.interval_s)
            try:
                await self.tick()
            except Exception:  # one bad interval must not end autoscaling
                logger.exception("autoscaling: the interval failed")

    def _roles(self) -> list[str]:
        roles = ["prefill", "decode"]
        if self.config.pools.attention.max > 0:
            roles.append("attention")
        return roles

    def _pool(self, role: str) -> str:
        return self.pools.decode_role if role == "decode" else role

    async def tick(self) -> Decision:
        now = time.monotonic()
        decode = [w for w in self.monitor.workers
                  if w.role == self.pools.decode_role and w.state == "ready"]
        decode_waiting = sum(w.stats.engine.num_waiting for w in decode if w.stats is not None)
        kv_use = sum(w.kv_cache_usage for w in decode) / len(decode) if decode else 0.0
        sample = self.window.sample(now, {"prefill": self.num_waiting(),
                                          "decode": decode_waiting}, kv_use)
        self.samples = [*self.samples[-(WINDOW - 1):], sample]
        for role in ROLES:
            self.pending[role] = [p for p in self.pending[role] if not p.task.done()]
        colocated = self.config.colocated
        state = {role: PoolState(
            0 if colocated and role == "prefill" else
            sum(1 for w in self.pools.of(self._pool(role)) if w.state == "ready"),
            tuple(p.started for p in self.pending[role])) for role in ROLES}
        decision, self.memory = decide(self.samples, self.profile, self.config.slo,
                                       self.config.autoscale, self.config.pools, state, now,
                                       self.memory, colocated=colocated)
        desired = dict(decision.desired)
        self.last = decision
        self.metrics.autoscale.desired = {r: desired[r] for r in self._roles()}
        for role in self._roles():
            if colocated and role == "prefill":
                continue
            await self._apply(role, desired[role], state[role],
                              decision.give_up.get(role, 0), decision.reasons[role])
        return decision

    async def _apply(self, role: str, want: int, state: PoolState, give_up: int,
                     reason: str) -> None:
        for stuck in self.pending[role][:give_up]:
            logger.warning("autoscaling: a %s worker pending for %.0f s is given up", role,
                           time.monotonic() - stuck.started)
            stuck.task.cancel()
            self.pending[role].remove(stuck)
        have = state.ready + len(self.pending[role])
        if want == have:
            return
        direction = "up" if want > have else "down"
        logger.info("autoscaling %s: %d -> %d (%s)", role, have, want, reason)
        key = (role, direction)
        self.metrics.autoscale.decisions[key] = self.metrics.autoscale.decisions.get(key, 0) + 1
        for _ in range(want - have):
            task = asyncio.get_running_loop().create_task(self.pools.add(self._pool(role)))
            task.add_done_callback(_log_failure(f"adding a {role} worker"))
            self.pending[role].append(_Pending(task, time.monotonic()))
        for _ in range(have - want):
            if self.pending[role]:  # not started yet: nothing to drain
                self.pending[role].pop().task.cancel()
                continue
            worker = self._least_busy(role)
            if worker is None:
                return
            task = asyncio.get_running_loop().create_task(self.pools.drain(worker))
            task.add_done_callback(_log_failure(f"draining {worker}"))
            self.draining.add(task)
            task.add_done_callback(self.draining.discard)

    def _least_busy(self, role: str) -> str | None:
        ready = [w for w in self.monitor.workers
                 if w.role == self._pool(role) and w.member.state == "ready"]
        if not ready:
            return None

        def load(w) -> int:
            return w.stats.num_open_requests if w.stats is not None else 0

        return min(ready, key=load).id


def _log_failure(what: str) -> Callable[[asyncio.Task], None]:
    def done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.warning("autoscaling: %s failed: %r", what, task.exception())
    return done


def start_autoscaling(config: ServeConfig, pools: PoolManager, monitor: WorkerMonitor,
                      metrics: ClusterMetrics, num_waiting: Callable[[], int]) -> AutoscaleLoop:
    """The loop of `serve --autoscale`, started; its profile is checked first."""
    assert config.autoscale.profile is not None  # ServeConfig requires it when enabled
    profile = ReplicaProfile.load(Path(config.autoscale.profile))
    loop = AutoscaleLoop(config, pools, monitor, metrics, num_waiting, profile)
    loop.start()
    return loop
