"""Pure builders: a TandemCluster spec in, the Kubernetes objects the operator owns out.

No API calls here (`kube.py` applies what these return), so every object can be checked in a
unit test. Selectors use only fixed labels (name, instance, component); the pod templates carry
the /health probes, an in-memory /dev/shm for Ray, GPU limits, the pool's placement rules and
the pod's own name (downward API) that its workers report in the Admin status.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from tandem.operator.spec import (
    GRPC_PORT,
    HTTP_PORT,
    RAY_PORT,
    TLS_DIR,
    TandemClusterSpec,
    serve_config_data,
)

MANAGED_BY = "tandem-operator"
CONFIG_DIR = "/etc/tandem/config"
NODE_HEALTH_PORT = 8080
SHM_SIZE = "8Gi"


def selector(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/instance": name,
            "app.kubernetes.io/component": component}


def labels(name: str, component: str) -> dict[str, str]:
    return {**selector(name, component), "app.kubernetes.io/part-of": "tandem",
            "app.kubernetes.io/managed-by": MANAGED_BY}


def head_name(name: str) -> str:
    return f"{name}-head"


def pool_name(name: str, role: str) -> str:
    return f"{name}-{role}"


def ray_secret_name(name: str) -> str:
    return f"{name}-ray-token"


def config_map(name: str, spec: TandemClusterSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{name}-config", "labels": labels(name, "head")},
            "data": {"serve.yaml": yaml.safe_dump(serve_config_data(spec), sort_keys=False)}}


def ray_token_secret(name: str, token: str) -> dict[str, Any]:
    """Ray's cluster token: every node of this cluster, and nothing else, joins with it."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": ray_secret_name(name), "labels": labels(name, "head")},
            "stringData": {"token": token}}


def head_service(name: str) -> dict[str, Any]:
    ports = [("grpc", GRPC_PORT), ("http", HTTP_PORT), ("ray", RAY_PORT)]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": head_name(name), "labels": labels(name, "head")},
            "spec": {"selector": selector(name, "head"),
                     "ports": [{"name": n, "port": p, "targetPort": p} for n, p in ports]}}


def _env(name: str, spec: TandemClusterSpec, head: bool) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE",
         "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": ray_secret_name(name), "key": "token"}}},
    ]
    if head and spec.api_key_secret:
        env.append({"name": "TANDEM_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": spec.api_key_secret, "key": "api-keys"}}})
    if head and spec.store.redis_password_secret:
        env.append({"name": "TANDEM_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {
            "name": spec.store.redis_password_secret, "key": "password"}}})
    return env


def _probes(port: int) -> dict[str, Any]:
    def probe(**extra: int) -> dict[str, Any]:
        return {"httpGet": {"path": "/health", "port": port}, "periodSeconds": 10, **extra}

    # startup allows the model's load (minutes on a cold node); liveness only after it
    return {"startupProbe": probe(failureThreshold=90),
            "readinessProbe": probe(failureThreshold=3),
            "livenessProbe": probe(failureThreshold=6, timeoutSeconds=5)}


def _pod_spec(name: str, spec: TandemClusterSpec, container: dict[str, Any],
              role: str | None, volumes: list[dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
                    *volumes],
    }
    container.setdefault("volumeMounts", []).insert(0, {"name": "dshm",
                                                        "mountPath": "/dev/shm"})
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in spec.image_pull_secrets]
    if role is not None:
        pool = spec.pool(role)
        if pool.node_selector:
            pod["nodeSelector"] = dict(pool.node_selector)
        if pool.tolerations:
            pod["tolerations"] = [dict(t) for t in pool.tolerations]
        if pool.affinity:
            pod["affinity"] = dict(pool.affinity)
    return pod


def _deployment(name: str, component: str, replicas: int, pod: dict[str, Any],
                annotations: dict[str, str] | None = None) -> dict[str, Any]:
    template_meta: dict[str, Any] = {"labels": labels(name, component)}
    if annotations:
        template_meta["annotations"] = annotations
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": pool_name(name, component), "labels": labels(name, component)},
            "spec": {"replicas": replicas, "selector": {"matchLabels": selector(name, component)},
                     "template": {"metadata": template_meta, "spec": pod}}}


def head_deployment(name: str, spec: TandemClusterSpec) -> dict[str, Any]:
    """The Ray head, running the gateway (gRPC and HTTP), the router and the metrics."""
    command = (f"ray start --head --port={RAY_PORT} --num-cpus=0 --disable-usage-stats && "
               f"exec tandem serve --config {CONFIG_DIR}/serve.yaml")
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    volumes: list[dict[str, Any]] = [{"name": "config",
                                      "configMap": {"name": f"{name}-config"}}]
    if spec.tls is not None:
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        volumes.append({"name": "tls", "secret": {"secretName": spec.tls.secret_name}})
    container = {
        "name": "head", "image": spec.image, "imagePullPolicy": spec.image_pull_policy,
        "command": ["/bin/sh", "-c", command], "env": _env(name, spec, head=True),
        "ports": [{"name": "grpc", "containerPort": GRPC_PORT},
                  {"name": "http", "containerPort": HTTP_PORT},
                  {"name": "ray", "containerPort": RAY_PORT}],
        "volumeMounts": mounts,
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}},
        **_probes(HTTP_PORT)}
    deployment = _deployment(name, "head", 1, _pod_spec(name, spec, container, None, volumes),
                             {"tandem.dev/config-hash": _hash(config_map(name, spec)["data"])})
    deployment["metadata"]["name"] = head_name(name)
    deployment["spec"]["strategy"] = {"type": "Recreate"}  # one head at a time
    return deployment


def pool_deployment(name: str, spec: TandemClusterSpec, role: str,
                    replicas: int) -> dict[str, Any]:
    """One pool's nodes: each pod joins the head's Ray cluster advertising its pool's resource
    (`tandem node`), and the head's pool manager starts a worker on it."""
    pool = spec.pool(role)
    resources: dict[str, dict[str, str]] = {k: dict(v) for k, v in pool.resources.items()}
    if pool.gpus:
        resources.setdefault("limits", {})["nvidia.com/gpu"] = str(pool.gpus)
    container = {
        "name": role, "image": spec.image, "imagePullPolicy": spec.image_pull_policy,
        "command": ["tandem", "node", "--role", role, "--head",
                    f"{head_name(name)}:{RAY_PORT}", "--health-port", str(NODE_HEALTH_PORT)],
        "env": _env(name, spec, head=False),
        "ports": [{"name": "health", "containerPort": NODE_HEALTH_PORT}],
        "resources": resources, **_probes(NODE_HEALTH_PORT)}
    return _deployment(name, role, replicas, _pod_spec(name, spec, container, role, []))


def _hash(data: dict[str, str]) -> str:
    """A digest of the head's config, in its pod template, so a changed config rolls it."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def owned(obj: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
    """`obj` with an ownerReference to the TandemCluster `owner` (its body's metadata), so
    deleting the cluster deletes it."""
    meta = owner["metadata"]
    ref = {"apiVersion": owner.get("apiVersion", "tandem.dev/v1alpha1"),
           "kind": owner.get("kind", "TandemCluster"), "name": meta["name"],
           "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}
    out = dict(obj)
    out["metadata"] = {**obj["metadata"], "ownerReferences": [ref]}
    return out
