"""`PoolManager`: the one owner of each pool's workers.

It starts them, adds, replaces and removes them, checks their health, and restarts a dead one
(a new actor whose `start()` runs again: Ray's own restarts would only re-run `__init__`) up to
a budget. Each worker has a stable id, "<role>-<slot>@<node>": a replacement takes the slot, and
so the id, of the worker it replaces. The router, the KV index and the monitor see the pools
through lists this manager changes in place (a slot keeps its index), so no one else creates or
kills workers. The autoscaler and the operator use this API and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import ray

from tandem.cluster.config import ServeConfig
from tandem.cluster.node_follower import wait_for_pool_nodes
from tandem.cluster.periodic import Periodic
from tandem.cluster.placement import start_pool
from tandem.cluster.pool_health import HEALTH_INTERVAL_S, check_health
from tandem.transfer.base import ReceiverInfo
from tandem.worker_base import WorkerInfo

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0
RESTART_BUDGET = 3  # restarts per slot; past it a dead worker stays dead (and is reported)
DRAIN_TIMEOUT_S = 60.0  # the wait for a draining worker to hold nothing


async def _nothing_to_move(worker: PoolWorker) -> int:
    return 0


@dataclass
class PoolWorker:
    role: str  # "prefill", "decode", "colocated" or "attention"
    slot: int  # its index in its pool's lists: stable for the life of the cluster
    actor: Any
    info: WorkerInfo | None = None
    state: str = "starting"  # starting, ready, draining, dead, removed
    restarts: int = 0
    node_id: str | None = None  # the Ray node it is pinned to (follow_nodes), else None
    emptied: bool | None = None  # after a drain: whether it held nothing when it was stopped

    @property
    def id(self) -> str:
        node = f"@{self.info.node}" if self.info is not None and self.info.node else ""
        pod = f"/{self.info.pod}" if self.info is not None and self.info.pod else ""
        return f"{self.role}-{self.slot}{node}{pod}"


class PoolManager:
    def __init__(self, config: ServeConfig, call_timeout_s: float,
                 restart_budget: int = RESTART_BUDGET) -> None:
        self.config, self.call_timeout_s = config, call_timeout_s
        self.restart_budget = restart_budget
        self.members: list[PoolWorker] = []
        # The views the router and the KV index index by slot; changed in place only.
        self.prefill_actors: list[Any] = []
        self.decode_actors: list[Any] = []  # colocated workers in colocated mode
        self.kv_transports: list[tuple[str, ...]] = []  # per prefill slot
        self.kv_receivers: list[tuple[ReceiverInfo, ...]] = []  # per decode slot
        self.attention_actors: list[Any] = []
        self.attention_infos: list[WorkerInfo | None] = []  # per attention slot; None: starting
        self.on_change: Callable[[PoolWorker], None] = lambda worker: None
        # Moves a draining decode worker's requests elsewhere (the router); how many moved.
        self.evict: Callable[[PoolWorker], Awaitable[int]] = _nothing_to_move
        self.progress: Callable[..., None] = lambda step, done=None, total=None: None
        self._health: Periodic | None = None
        self._drains: set[asyncio.Task] = set()  # drains asked for by SIGTERM
        self._lock = asyncio.Lock()  # one change at a time
        self.released_nodes: set[str] = set()  # drained pool nodes: no worker goes there again

    @property
    def decode_role(self) -> str:
        return "colocated" if self.config.colocated else "decode"

    @property
    def roles(self) -> tuple[str, ...]:
        return ("colocated",) if self.config.colocated else ("prefill", "decode", "attention")

    def of(self, role: str) -> list[PoolWorker]:
        return [w for w in self.members if w.role == role]

    def get(self, worker_id: str) -> PoolWorker:
        for w in self.members:
            if worker_id in (w.id, f"{w.role}-{w.slot}") or (
                    w.info is not None and w.info.pod and w.info.pod == worker_id):
                return w
        raise KeyError(f"no worker {worker_id!r}; workers: "
                       f"{', '.join(w.id for w in self.members)}")

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> list[WorkerInfo]:
        """Start the configured pools; every worker's info, prefill pool first."""
        c = self.config
        if c.follow_nodes:  # one worker on each pool node (Kubernetes)
            required = ("colocated",) if c.colocated else ("prefill", "decode")
            nodes = await wait_for_pool_nodes(self.roles, required, START_TIMEOUT_S,
                                              self.progress)
            for role, ids in nodes.items():
                for node_id in ids:
                    slot = len(self.of(role))
                    actor = start_pool(role, 1, c, first_slot=slot, node_id=node_id)[0]
                    self._append(PoolWorker(role, slot, actor, node_id=node_id))
        else:
            counts = {"colocated": c.prefill_workers + c.decode_workers} if c.colocated else \
                {"prefill": c.prefill_workers, "decode": c.decode_workers,
                 "attention": c.attention_workers}
            for role, count in counts.items():
                for actor in start_pool(role, count, c, first_slot=0):
                    self._append(PoolWorker(role, len(self.of(role)), actor))
        loaded = 0
        total = len(self.members)
        self.progress("loading the model in each worker", 0, total)

        async def start(worker: PoolWorker) -> None:
            nonlocal loaded
            await self._start(worker)
            loaded += 1
            self.progress("loading the model in each worker", loaded, total)

        try:
            await asyncio.wait_for(asyncio.gather(*(start(w) for w in self.members)),
                                   START_TIMEOUT_S)
        except TimeoutError:
            raise TimeoutError(f"{total - loaded} of {total} workers did not start in "
                               f"{START_TIMEOUT_S:.0f} s") from None
        return [w.info for w in self.members]  # type: ignore[misc]

    async def _start(self, worker: PoolWorker) -> None:
        worker.info = await worker.actor.start.remote()
        if worker.role == "prefill":
            self.kv_transports[worker.slot] = worker.info.kv_transports
        elif worker.role == "attention":
            self.attention_infos[worker.slot] = worker.info
        else:
            self.kv_receivers[worker.slot] = worker.info.kv_receivers
        worker.state = "ready"

    def _append(self, worker: PoolWorker) -> None:
        self.members.append(worker)
        if worker.role == "prefill":
            self.prefill_actors.append(worker.actor)
            self.kv_transports.append(())
        elif worker.role == "attention":
            self.attention_actors.append(worker.actor)
            self.attention_infos.append(None)
        else:
            self.decode_actors.append(worker.actor)
            self.kv_receivers.append(())

    async def add(self, role: str, node_id: str | None = None) -> PoolWorker:
        """Start one more worker in `role`'s pool (on the Ray node `node_id`, if given); it
        serves once its model is loaded."""
        async with self._lock:
            self._check_role(role)
            slot = len(self.of(role))
            worker = PoolWorker(role, slot, start_pool(role, 1, self.config, first_slot=slot,
                                                       node_id=node_id)[0], node_id=node_id)
            self._append(worker)
            await self._start(worker)
            logger.info("worker %s added", worker.id)
            self.on_change(worker)
            return worker

    async def replace(self, worker_id: str) -> PoolWorker:
        """A fresh worker in the slot of `worker_id` (which is stopped if it still runs)."""
        async with self._lock:
            return await self._replace(self.get(worker_id))

    async def _replace(self, old: PoolWorker) -> PoolWorker:
        await self._stop(old.actor)
        actor = start_pool(old.role, 1, self.config, first_slot=old.slot,
                           node_id=old.node_id)[0]
        new = PoolWorker(old.role, old.slot, actor, restarts=old.restarts,
                         node_id=old.node_id)
        self.members[self.members.index(old)] = new
        self._actors(old.role)[old.slot] = actor
        try:
            await asyncio.wait_for(self._start(new), START_TIMEOUT_S)
        except Exception:
            new.state = "dead"
            raise
        logger.info("worker %s replaced", new.id)
        await self._forget(old)
        self.on_change(new)
        return new

    async def remove(self, worker_id: str) -> None:
        """Stop a worker; its slot stays empty (routers skip it). Requests it was serving
        resume elsewhere."""
        async with self._lock:
            worker = self.get(worker_id)
            await self._stop(worker.actor)
            worker.state = "removed"
            logger.info("worker %s removed", worker.id)
            await self._forget(worker)
            self.on_change(worker)

    async def drain(self, worker_id: str, timeout_s: float = DRAIN_TIMEOUT_S) -> int:
        """Take a worker out of service without losing a stream: it gets no new request, a
        decode worker's running requests move to other decode workers (re-prefill of their
        prompt and tokens so far), a prefill worker finishes what it holds; then it is
        removed. The number of requests moved."""
        worker = self.get(worker_id)
        if worker.state != "ready":
            raise ValueError(f"worker {worker.id} is {worker.state}, not ready")
        worker.state = "draining"
        if worker.node_id:  # its pod is going: no worker goes on that node again
            self.released_nodes.add(worker.node_id)
        self.on_change(worker)
        moved = await self.evict(worker) if worker.role in ("decode", "colocated") else 0
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:  # until it holds nothing (bounded: what is left is freed by remove)
            try:
                stats = await asyncio.wait_for(worker.actor.stats.remote(), self.call_timeout_s)
            except Exception:  # it died meanwhile: nothing left to wait for
                worker.emptied = False
                break
            e = stats.engine
            if stats.num_open_requests == 0 and e.num_free_blocks == e.num_blocks:
                worker.emptied = True
                break
            if asyncio.get_running_loop().time() > deadline:
                logger.warning("worker %s still held requests after %.0f s of draining",
                               worker.id, timeout_s)
                worker.emptied = False
                break
            await asyncio.sleep(0.2)
        async with self._lock:
            await self._stop(worker.actor)
            worker.state = "removed"
        logger.info("worker %s drained (%d requests moved) and removed", worker.id, moved)
        await self._forget(worker)
        self.on_change(worker)
        return moved

    def _actors(self, role: str) -> list[Any]:
        return {"prefill": self.prefill_actors, "attention": self.attention_actors}.get(
            role, self.decode_actors)

    def _check_role(self, role: str) -> None:
        allowed = ("colocated",) if self.config.colocated else ("prefill", "decode", "attention")
        if role not in allowed:
            raise ValueError(f"role: {role!r} is not a pool of this cluster "
                             f"({', '.join(allowed)})")

    async def _forget(self, gone: PoolWorker) -> None:
        """Have the serving workers drop what their KV transports keep about a worker that is
        gone (NIXL: its agent), so stale peers do not pile up across restarts."""
        ids = list(gone.info.kv_peer_ids) if gone.info is not None else []
        serving = [w for w in self.members if w.state == "ready" and w is not gone]
        if not ids or not serving:
            return
        results = await asyncio.gather(
            *(asyncio.wait_for(w.actor.forget_kv_peers.remote(ids), self.call_timeout_s)
              for w in serving), return_exceptions=True)
        for worker, result in zip(serving, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("worker %s could not drop the KV peers of %s: %r", worker.id,
                               gone.id, result)

    async def check_health(self) -> list[str]:
        return await check_health(self)

    async def _stop(self, actor: Any) -> None:
        with contextlib.suppress(Exception):  # it may be dead already
            await asyncio.wait_for(actor.shutdown.remote(), 10.0)
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)

    def start_health_checks(self, interval_s: float = HEALTH_INTERVAL_S) -> None:
        self._health = Periodic("health check", interval_s, self.check_health)
        self._health.start()

    async def shutdown(self) -> None:
        if self._health is not None:
            await self._health.stop()
        await asyncio.gather(*(self._stop(w.actor) for w in self.members),
                             return_exceptions=True)
