"""What the operator does for one TandemCluster, apart from kopf's wiring (`main.py`):
write the objects it owns (`reconcile`), run an autoscaling round and write the status
(`autoscale_round`), and put back a Deployment edited by hand (`restore`)."""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

import tandem
from tandem.cluster.profile import ReplicaProfile
from tandem.operator import builders, kube
from tandem.operator.errors import SpecInvalid
from tandem.operator.gateway import GatewayClient
from tandem.operator.scaler import ClusterMemory, Scaler, roles
from tandem.operator.settings import OperatorSettings
from tandem.operator.spec import TandemClusterSpec
from tandem.operator.status import build_status

logger = logging.getLogger(__name__)


def parse_spec(spec: dict[str, Any]) -> TandemClusterSpec:
    try:
        return TandemClusterSpec.model_validate(spec)
    except ValidationError as e:
        problems = "; ".join(f"spec.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                             for err in e.errors())
        raise SpecInvalid(problems) from None


def load_profile(path: str) -> ReplicaProfile:
    file = Path(path)
    if not file.is_absolute():  # relative: inside the installed package's tree
        file = Path(tandem.__file__).resolve().parent.parent / file
    try:
        return ReplicaProfile.load(file)
    except (OSError, ValueError) as e:
        raise SpecInvalid(f"spec.autoscaling.profile: {e}") from None


class Operator:
    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.memory: dict[tuple[str, str], ClusterMemory] = {}

    # -- objects -------------------------------------------------------------------------------

    def objects(self, body: dict[str, Any], spec: TandemClusterSpec,
                replicas: dict[str, int]) -> list[dict[str, Any]]:
        name = body["metadata"]["name"]
        built = [builders.config_map(name, spec), builders.head_service(name),
                 builders.head_deployment(name, spec)]
        built += [builders.pool_deployment(name, spec, role, replicas[role])
                  for role in roles(spec)]
        return [builders.owned(obj, body) for obj in built]

    def _memory(self, name: str, namespace: str, spec: TandemClusterSpec) -> ClusterMemory:
        key = (namespace, name)
        if key not in self.memory:
            replicas = {}
            for role in roles(spec):  # an operator restart keeps the counts it had written
                live = kube.read("Deployment", builders.pool_name(name, role), namespace)
                pool = spec.pool(role)
                start = pool.replicas if not spec.autoscaling.enabled else \
                    min(max(pool.replicas, pool.min), pool.max)
                replicas[role] = live["spec"]["replicas"] if live else start
            self.memory[key] = ClusterMemory(replicas)
        memory = self.memory[key]
        for role in roles(spec):  # a pool the spec has just added
            memory.replicas.setdefault(role, spec.pool(role).replicas)
        return memory

    def reconcile(self, body: dict[str, Any]) -> dict[str, str]:
        """Create or put back every object the cluster owns; what happened to each."""
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        spec = parse_spec(body.get("spec") or {})
        memory = self._memory(name, namespace, spec)
        token = builders.owned(builders.ray_token_secret(name, secrets.token_urlsafe(32)), body)
        done = {builders.ray_secret_name(name): kube.apply(token, namespace)}
        for obj in self.objects(body, spec, memory.replicas):
            done[obj["metadata"]["name"]] = kube.apply(obj, namespace)
        return done

    def report_invalid(self, name: str, namespace: str, generation: int,
                       error: SpecInvalid) -> None:
        """A permanent failure, in the status: the spec cannot be served as written."""
        kube.patch_status(name, namespace, {
            "observedGeneration": generation, "error": str(error),
            "conditions": [{"type": "Degraded", "status": "True", "reason": "InvalidSpec",
                            "message": str(error)[:1000]}]})

    def restore(self, deployment: dict[str, Any]) -> str | None:
        """Put back a Deployment the operator owns; None when its owner is gone."""
        meta = deployment["metadata"]
        owner = next((r for r in meta.get("ownerReferences") or []
                      if r.get("kind") == "TandemCluster"), None)
        if owner is None:
            return None
        body = kube.read_cluster(owner["name"], meta["namespace"])
        if body is None:
            return None
        spec = parse_spec(body.get("spec") or {})
        memory = self._memory(owner["name"], meta["namespace"], spec)
        for obj in self.objects(body, spec, memory.replicas):
            if obj["kind"] == "Deployment" and obj["metadata"]["name"] == meta["name"]:
                return kube.apply(obj, meta["namespace"])
        return None

    # -- autoscaling ---------------------------------------------------------------------------

    def gateway(self, name: str, namespace: str, spec: TandemClusterSpec) -> GatewayClient:
        key = None
        if spec.api_key_secret:
            keys = kube.secret_value(spec.api_key_secret, namespace, "api-keys") or ""
            key = next((k.strip() for k in keys.split(",") if k.strip()), None)
        roots = None
        if spec.tls is not None:
            roots_text = kube.secret_value(spec.tls.secret_name, namespace, "ca.crt") or \
                kube.secret_value(spec.tls.secret_name, namespace, "tls.crt")
            roots = roots_text.encode() if roots_text else None
        return GatewayClient(name, namespace, self.settings, key, roots)

    def autoscale_round(self, name: str, namespace: str) -> float | None:
        """One round; the seconds until the next, or None once the cluster is gone."""
        body = kube.read_cluster(name, namespace)
        if body is None:
            self.memory.pop((namespace, name), None)
            return None
        previous = body.get("status") or {}
        generation = body["metadata"].get("generation", 0)
        try:
            spec = parse_spec(body.get("spec") or {})
            profile = load_profile(spec.autoscaling.profile)
        except SpecInvalid as e:
            self.report_invalid(name, namespace, generation, e)
            return 30.0
        self.reconcile(body)
        memory = self._memory(name, namespace, spec)
        gateway = self.gateway(name, namespace, spec)
        try:
            desired, reasons, pods, page, sample, problems = \
                Scaler(name, namespace, gateway, profile, memory).round(spec)
        finally:
            gateway.close()
        if page is None and memory.created + self.settings.startup_grace_s > time.monotonic():
            problems = [p for p in problems if not p.startswith("metrics unavailable")]
        status = build_status(generation, desired, memory.replicas, reasons, pods,
                              page is not None, sample, problems, None, previous)
        kube.patch_status(name, namespace, status)
        for line in memory.transcript:
            logger.info("%s/%s: %s", namespace, name, line)
        return spec.autoscaling.interval_seconds
