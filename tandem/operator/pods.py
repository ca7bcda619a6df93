"""A pool's pods as the operator counts them: ready, pending (capacity that is not there yet),
or already drained (on their way out: not counted)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kubernetes.client import V1Pod

from tandem.operator import kube
from tandem.operator.builders import selector

DRAINED = "tandem.dev/drained"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
LOWEST_COST = str(-(2**31) + 1)  # the ReplicaSet removes this pod before any other


@dataclass
class PoolPods:
    ready: list[V1Pod] = field(default_factory=list)
    pending: list[V1Pod] = field(default_factory=list)  # oldest first


def is_ready(pod: V1Pod) -> bool:
    conditions = (pod.status.conditions or []) if pod.status else []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def pool_pods(name: str, namespace: str, role: str) -> PoolPods:
    out = PoolPods()
    for pod in kube.pods(namespace, selector(name, role)):
        meta = pod.metadata
        if meta.deletion_timestamp is not None or (meta.annotations or {}).get(DRAINED):
            continue
        (out.ready if is_ready(pod) else out.pending).append(pod)
    out.pending.sort(key=lambda p: p.metadata.creation_timestamp)
    return out


def mark_drained(pod: V1Pod) -> None:
    """The drained pod is the one the ReplicaSet deletes when the count drops."""
    kube.annotate_pod(pod.metadata.name, pod.metadata.namespace,
                      {DELETION_COST: LOWEST_COST, DRAINED: "true"})
