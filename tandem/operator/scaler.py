"""One autoscaling round for one TandemCluster: metrics in, the policy's decision, replicas
and status out.

The operator is the one writer of each pool's replica count. A scale-up raises it. A
scale-down never drops a stream: for each pod to remove it (1) asks the gateway to drain that
pod's worker (`Admin.Drain`: its streams move to other workers), (2) waits, bounded, until the
worker is gone, (3) marks exactly that pod with the lowest `pod-deletion-cost`, and only then
(4) lowers the count, so the ReplicaSet deletes that pod. Pending pods are removed first (they
hold nothing). Pods pending past `pendingTimeoutSeconds` count as no capacity and are deleted,
so a pool never waits on a pod that will not come (dynamo#14251).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from tandem.client import TandemError
from tandem.cluster.autoscaler import WINDOW, LoadSample, PolicyMemory, PoolState, decide
from tandem.cluster.load_window import LoadWindow
from tandem.cluster.profile import ReplicaProfile
from tandem.operator import kube
from tandem.operator.builders import pool_name
from tandem.operator.gateway import GatewayClient, MetricsPage
from tandem.operator.pods import PoolPods, mark_drained, pool_pods
from tandem.operator.spec import (
    POOL_ROLES,
    TandemClusterSpec,
    autoscale_config,
    pools_config,
    slo_config,
)

logger = logging.getLogger(__name__)


@dataclass
class ClusterMemory:
    """What the operator keeps about one cluster between rounds."""

    replicas: dict[str, int]  # the count the operator holds per pool
    created: float = field(default_factory=time.monotonic)
    window: LoadWindow = field(default_factory=LoadWindow)  # fed the page the round reads
    samples: list[LoadSample] = field(default_factory=list)
    policy: PolicyMemory = field(default_factory=PolicyMemory)
    transcript: list[str] = field(default_factory=list)  # the last round's actions


def roles(spec: TandemClusterSpec) -> list[str]:
    return [r for r in POOL_ROLES if r != "attention"
            or spec.pools.attention.max > 0 or spec.pools.attention.replicas > 0]


def _created_at(pod: Any) -> float:
    return pod.metadata.creation_timestamp.timestamp()


class Scaler:
    def __init__(self, name: str, namespace: str, gateway: GatewayClient,
                 profile: ReplicaProfile, memory: ClusterMemory) -> None:
        self.name, self.namespace, self.gateway = name, namespace, gateway
        self.profile, self.memory = profile, memory

    def round(self, spec: TandemClusterSpec, now: float | None = None) \
            -> tuple[dict[str, int], dict[str, str], dict[str, PoolPods], MetricsPage | None,
                     LoadSample | None, list[str]]:
        """Decide and act; (desired, reasons, pods, metrics page, sample, problems)."""
        now = time.time() if now is None else now
        m = self.memory
        m.transcript = []
        pods = {role: pool_pods(self.name, self.namespace, role) for role in roles(spec)}
        page, sample, problems = None, None, []
        try:
            page = self.gateway.metrics()
        except Exception as e:  # the head may still be loading; the round goes on without
            problems.append(f"metrics unavailable: {e}")
        timeout = spec.autoscaling.pending_timeout_seconds
        stuck = {role: [p for p in pp.pending if now - _created_at(p) > timeout]
                 for role, pp in pods.items()}
        if spec.autoscaling.enabled and page is not None:
            m.window.quantile = spec.slo.percentile / 100
            sample = m.window.sample(now, {"prefill": page.waiting}, page.decode_kv_use,
                                     values=page.families)
            m.samples = [*m.samples[-(WINDOW - 1):], sample]
            state = {role: PoolState(len(pp.ready), tuple(_created_at(p) for p in pp.pending))
                     for role, pp in pods.items()}
            decision, m.policy = decide(m.samples, self.profile, slo_config(spec),
                                        autoscale_config(spec), pools_config(spec), state, now,
                                        m.policy)
            desired = {r: decision.desired[r] for r in pods}
            reasons = {r: decision.reasons[r] for r in pods}
        elif spec.autoscaling.enabled:
            desired = {r: m.replicas[r] for r in pods}
            reasons = {r: "held: no metrics this round" for r in pods}
        else:
            desired = {r: spec.pool(r).replicas for r in pods}
            reasons = {r: f"autoscaling off: spec.pools.{r}.replicas" for r in pods}
        for role, late in stuck.items():
            for pod in late:
                kube.delete_pod(pod.metadata.name, self.namespace)
                pods[role].pending.remove(pod)
                problems.append(f"{role} pod {pod.metadata.name} pending over {timeout:.0f} s: "
                                "given up")
                m.transcript.append(f"deleted pending pod {pod.metadata.name}")
        for role in pods:
            self._resize(role, desired[role], pods[role], reasons[role])
        return desired, reasons, pods, page, sample, problems

    def _resize(self, role: str, want: int, pods: PoolPods, reason: str) -> None:
        held = self.memory.replicas[role]
        deployment = pool_name(self.name, role)
        if want > held:
            kube.set_replicas(deployment, self.namespace, want)
            self.memory.replicas[role] = want
            self.memory.transcript.append(f"{role}: {held} -> {want} ({reason})")
            logger.info("%s/%s %s: %d -> %d (%s)", self.namespace, self.name, role, held, want,
                        reason)
            return
        if want >= held:
            return
        count = held
        for pod in self._victims(pods, held - want):
            if pod in pods.ready and not self._drain(role, pod.metadata.name):
                break  # not drained: no pod of this pool goes this round
            mark_drained(pod)
            count -= 1
            kube.set_replicas(deployment, self.namespace, count)
            self.memory.replicas[role] = count
            self.memory.transcript.append(
                f"{role}: drained and marked {pod.metadata.name}; {count + 1} -> {count}")
        if count == held and held - want > len(pods.ready) + len(pods.pending):
            # more replicas held than pods exist (pods not created yet): nothing to drain
            kube.set_replicas(deployment, self.namespace, want)
            self.memory.replicas[role] = want
            self.memory.transcript.append(f"{role}: {held} -> {want} (no pod to drain)")

    def _victims(self, pods: PoolPods, count: int) -> list[Any]:
        """Pending pods first (newest first: they hold nothing), then the ready pods whose
        workers run the fewest requests."""
        chosen = list(reversed(pods.pending))[:count]
        if len(chosen) < count:
            load = self._open_requests()
            ready = sorted(pods.ready, key=lambda p: load.get(p.metadata.name, 0))
            chosen += ready[:count - len(chosen)]
        return chosen

    def _open_requests(self) -> dict[str, int]:
        try:
            status = self.gateway.status()
        except TandemError as e:
            logger.warning("%s/%s: no worker status (%s); draining by age", self.namespace,
                           self.name, e)
            return {}
        return {w.pod: w.open_requests for w in status.workers if w.pod}

    def _drain(self, role: str, pod: str) -> bool:
        """Drain the worker on `pod`; True once it is gone (or there was none)."""
        try:
            reply = self.gateway.drain(pod)
        except TandemError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return True  # its worker never started, or is gone already: nothing to move
            logger.warning("%s/%s: could not drain %s pod %s: %s; not scaling it down now",
                           self.namespace, self.name, role, pod, e)
            self.memory.transcript.append(f"{role}: drain of {pod} failed: {e}")
            return False
        self.memory.transcript.append(f"{role}: drained {reply.worker_id} "
                                      f"({reply.moved_requests} requests moved)")
        return True
