"""`WorkerMonitor`: the gateway's view of its workers, gathered off the request path.

Every `interval_s` it asks each worker for its stats (with the control-call deadline), keeps
the latest answer per worker, and publishes the cluster-wide figures the metrics export
(`WorkerFigures`). The Admin service's `Status` reads the same snapshot, so neither a scrape nor
a status call waits on a worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass

from tandem.cluster.metrics import (
    CHUNK_REUSE_COUNTERS,
    ClusterMetrics,
    TierFigures,
    WorkerFigures,
)
from tandem.cluster.offload_metrics import offload_figures
from tandem.cluster.periodic import Periodic
from tandem.cluster.pools import PoolManager, PoolWorker
from tandem.worker_base import WorkerInfo, WorkerStats

logger = logging.getLogger(__name__)

INTERVAL_S = 2.0


@dataclass
class WorkerState:
    """One worker as last seen."""

    member: PoolWorker
    stats: WorkerStats | None = None
    seen_at: float = 0.0  # time.monotonic() of the last answer
    error: str | None = None  # why the last call failed

    @property
    def id(self) -> str:  # "<role>-<slot>@<node>", plus "/<pod>" on Kubernetes: stable
        return self.member.id

    @property
    def role(self) -> str:
        return self.member.role

    @property
    def info(self) -> WorkerInfo | None:
        return self.member.info

    @property
    def state(self) -> str:
        if self.member.state != "ready":
            return self.member.state
        return "ready" if self.error is None and self.stats is not None else "unreachable"

    @property
    def kv_cache_usage(self) -> float:
        if self.stats is None or not self.stats.engine.num_blocks:
            return 0.0
        e = self.stats.engine
        return 1.0 - e.num_free_blocks / e.num_blocks


class WorkerMonitor:
    def __init__(self, pools: PoolManager, metrics: ClusterMetrics, call_timeout_s: float,
                 interval_s: float = INTERVAL_S) -> None:
        self.pools, self.metrics = pools, metrics
        self.call_timeout_s, self.interval_s = call_timeout_s, interval_s
        self._states: dict[tuple[str, int], WorkerState] = {}
        self.started = time.monotonic()
        # figures first, then every interval: a failed round must not freeze them
        self._periodic = Periodic("gathering worker figures", interval_s, self.refresh,
                                  first_at_once=True)

    @property
    def workers(self) -> list[WorkerState]:
        """Every worker the pools have, in pool order, with what was last seen of it."""
        states = []
        for member in self.pools.members:
            state = self._states.get((member.role, member.slot))
            if state is None or state.member is not member:  # new, or a replacement
                state = self._states[(member.role, member.slot)] = WorkerState(member)
            states.append(state)
        return states

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def refresh(self) -> None:
        """Ask every serving worker at once, then publish the figures."""
        workers = [w for w in self.workers if w.member.state == "ready"]
        answers = await asyncio.gather(
            *(asyncio.wait_for(w.member.actor.stats.remote(), self.call_timeout_s)
              for w in workers), return_exceptions=True)
        now = time.monotonic()
        for worker, answer in zip(workers, answers, strict=True):
            if isinstance(answer, BaseException):
                if worker.error is None:
                    logger.warning("worker %s did not answer: %r", worker.id, answer)
                worker.error = repr(answer)
            else:
                worker.stats, worker.seen_at, worker.error = answer, now, None
        self.metrics.workers = self.figures()

    def figures(self) -> WorkerFigures:
        live = [w for w in self.workers if w.member.state == "ready"]
        tiers: dict[str, TierFigures] = {}
        levels: Counter[str] = Counter()
        reuse: Counter[str] = Counter()
        for w in live:
            if w.stats is None:
                continue
            if w.stats.kv_store is not None:
                for t in w.stats.kv_store.tiers:
                    old = tiers.get(t.name, TierFigures())
                    tiers[t.name] = TierFigures(
                        old.hits + t.hits, old.misses + t.misses, old.used_bytes + t.used_bytes,
                        old.bytes_read + t.bytes_read, old.bytes_written + t.bytes_written,
                        old.evictions + t.evictions, old.corrupt + t.corrupt)
            for choice, count in w.stats.kv_codec_choices.items():
                levels[choice.removeprefix("cachegen:")] += count
            if w.stats.chunk_reuse is not None:
                for name in CHUNK_REUSE_COUNTERS:
                    reuse[name] += getattr(w.stats.chunk_reuse, name)
        return WorkerFigures(
            kv_cache_usage={(w.id, w.role): w.kv_cache_usage for w in live
                            if w.stats is not None},
            tiers=tiers, cachegen_levels=dict(levels),
            pool_workers=dict(Counter(w.role for w in live)),
            num_running=sum(w.stats.engine.num_running for w in live
                            if w.stats is not None and w.role in ("decode", "colocated")),
            offload=offload_figures([(w.id, w.stats) for w in live if w.stats is not None]),
            chunk_reuse=dict(reuse))
