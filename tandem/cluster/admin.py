"""The Admin service (`tandem.v1.Admin`): operators' view of the pools and their workers.

`Status` answers from the `WorkerMonitor`'s snapshot (refreshed every few seconds off the
request path), so it never waits on a worker. The gateway's API keys and TLS protect it like
the Tandem service. `Drain` takes a worker out of service through the pool manager, moving its
running requests to other workers first.
"""

from __future__ import annotations

import time
from collections import Counter

import grpc

from tandem.cluster.auth import ApiKeys
from tandem.cluster.offload_metrics import offload_status
from tandem.cluster.router import Router
from tandem.cluster.wire import reject_unparsable
from tandem.cluster.worker_status import WorkerMonitor, WorkerState
from tandem.proto.v1 import admin_pb2 as apb
from tandem.proto.v1 import admin_pb2_grpc as apb_grpc


class AdminService(apb_grpc.AdminServicer):
    def __init__(self, model: str, monitor: WorkerMonitor, router: Router, keys: ApiKeys) \
            -> None:
        self.model, self.monitor, self.router, self.keys = model, monitor, router, keys

    async def Drain(self, request: apb.DrainRequest, context: grpc.aio.ServicerContext) \
            -> apb.DrainResponse:
        await self.keys.check(context)
        await reject_unparsable(request, context)
        pools = self.monitor.pools
        try:
            worker = pools.get(request.worker_id)
            moved = await pools.drain(request.worker_id)
        except KeyError as e:  # no such worker (the operator drains by pod name)
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"worker_id: {e.args[0] if e.args else e}")
        except ValueError as e:  # not ready (starting, or draining already)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"worker_id: {e.args[0] if e.args else e}")
        return apb.DrainResponse(worker_id=worker.id, moved_requests=moved)

    async def Status(self, request: apb.StatusRequest, context: grpc.aio.ServicerContext) \
            -> apb.StatusResponse:
        await self.keys.check(context)
        await reject_unparsable(request, context)
        return status_of(self.model, self.monitor, self.router)


def status_of(model: str, monitor: WorkerMonitor, router: Router) -> apb.StatusResponse:
    workers = monitor.workers
    ready = Counter(w.role for w in workers if w.state == "ready")
    total = Counter(w.role for w in workers)
    now = time.monotonic()
    return apb.StatusResponse(
        model=model,
        pools=[apb.PoolStatus(role=role, workers=n, ready=ready[role])
               for role, n in total.items()],
        workers=[_worker(w, now) for w in workers],
        num_requests_running=sum(w.stats.engine.num_running for w in workers
                                 if w.stats is not None
                                 and w.role in ("decode", "colocated")),
        num_requests_waiting=router.num_queued,
        uptime_s=now - monitor.started)


def _worker(w: WorkerState, now: float) -> apb.WorkerStatus:
    status = apb.WorkerStatus(id=w.id, role=w.role, state=w.state,
                              node=w.info.node if w.info else "",
                              pod=w.info.pod if w.info else "", pid=w.info.pid if w.info else 0,
                              kv_cache_usage=w.kv_cache_usage,
                              age_s=now - w.seen_at if w.seen_at else 0.0)
    s = w.stats
    if s is None or w.member.state != "ready":
        return status
    status.num_running = s.engine.num_running
    status.rss_bytes = s.rss_bytes
    status.open_requests = s.num_open_requests
    status.num_waiting = s.engine.num_waiting + s.engine.num_reserved
    status.handoffs = sum(s.handoffs.values())
    status.handoff_gbps = s.handoff_bytes / s.handoff_s / 1e9 if s.handoff_s > 0 else 0.0
    offload = offload_status(s)
    if offload is not None:
        status.offload.CopyFrom(offload)
    if s.kv_store is not None:
        for t in s.kv_store.tiers:
            lookups = t.hits + t.misses
            status.tiers.append(apb.TierStatus(
                tier=t.name, hits=t.hits, misses=t.misses,
                hit_rate=t.hits / lookups if lookups else 0.0, bytes_used=t.used_bytes))
    return status
