"""Replica lifecycle and billing: started (pending for the start-up time), ready, draining
(takes no new work, stops when empty), stopped. A replica is paid from start to stop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tandem.cluster.autoscaler import ROLES, PoolState


@dataclass
class Replica:
    started: float
    ready_at: float
    stopped: float | None = None
    draining: bool = False

    def is_ready(self, now: float) -> bool:
        return self.stopped is None and not self.draining and now >= self.ready_at

    def is_pending(self, now: float) -> bool:
        return self.stopped is None and not self.draining and now < self.ready_at


class Fleet:
    """Every replica each pool has had, indexed per role in start order."""

    def __init__(self, startup_s: float, prices: dict[str, float]) -> None:
        self.startup_s = startup_s
        self.prices = prices
        self.replicas: dict[str, list[Replica]] = {role: [] for role in ROLES}
        # ready lists are asked for every slice; they change only at a start, a drain, a stop
        # or a pending replica's ready time
        self._ready: dict[str, tuple[float, float, list[int]]] = {}

    def start(self, role: str, now: float, *, warm: bool = False) -> int:
        """A new replica; `warm` ones (the initial provisioning) are ready at once."""
        ready_at = now if warm else now + self.startup_s
        self.replicas[role].append(Replica(started=now, ready_at=ready_at))
        self._ready.pop(role, None)
        return len(self.replicas[role]) - 1

    def ready(self, role: str, now: float) -> list[int]:
        cached = self._ready.get(role)
        if cached is not None and cached[0] <= now < cached[1]:
            return cached[2]
        ready = [i for i, r in enumerate(self.replicas[role]) if r.is_ready(now)]
        upcoming = [r.ready_at for r in self.replicas[role] if r.is_pending(now)]
        self._ready[role] = (now, min(upcoming, default=float("inf")), ready)
        return ready

    def serving(self, role: str, now: float) -> list[int]:
        """Replicas that still hold work: ready or draining."""
        return [i for i, r in enumerate(self.replicas[role])
                if r.stopped is None and now >= r.ready_at]

    def pending(self, role: str, now: float) -> list[int]:
        return [i for i, r in enumerate(self.replicas[role]) if r.is_pending(now)]

    def drain(self, role: str, index: int) -> None:
        self.replicas[role][index].draining = True
        self._ready.pop(role, None)

    def stop(self, role: str, index: int, now: float) -> None:
        replica = self.replicas[role][index]
        if replica.stopped is None:
            replica.stopped = now
        self._ready.pop(role, None)

    def cancel_pending(self, role: str, now: float) -> bool:
        """Stop the newest replica still starting (it holds nothing to drain); False if none."""
        pending = self.pending(role, now)
        if not pending:
            return False
        self.drain(role, pending[-1])
        self.stop(role, pending[-1], now)
        return True

    def drain_least_loaded(self, role: str, now: float,
                           load: Callable[[int], float]) -> int | None:
        """Take one replica out: a starting one if any (stopped at once, it holds nothing),
        else the ready one with the least `load`, which starts draining; its index, or None
        when a pending one was stopped or none was ready."""
        if self.cancel_pending(role, now):
            return None
        ready = self.ready(role, now)
        if not ready:
            return None
        chosen = min(ready, key=load)
        self.drain(role, chosen)
        return chosen

    def state(self, role: str, now: float) -> PoolState:
        pending = tuple(self.replicas[role][i].started for i in self.pending(role, now))
        return PoolState(len(self.ready(role, now)), pending)

    def counts(self, role: str, now: float) -> tuple[int, int, int]:
        """(ready, pending, draining) replicas."""
        live = [r for r in self.replicas[role] if r.stopped is None]
        draining = sum(r.draining for r in live)
        pending = sum(r.is_pending(now) for r in live)
        return len(live) - draining - pending, pending, draining

    def hours(self, role: str, until: float) -> float:
        return sum(((r.stopped if r.stopped is not None else until) - r.started)
                   for r in self.replicas[role]) / 3600.0

    def cost(self, until: float) -> float:
        return sum(self.hours(role, until) * self.prices.get(role, 0.0) for role in ROLES)
