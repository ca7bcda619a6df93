"""The API calls that apply what the builders return, idempotently.

`apply` creates an object, or, when it exists and differs from what we built (a hand edit, a
changed spec), patches our fields back; fields the API server added are left alone. Secrets
are only ever created (the Ray token must stay what the running pods hold).
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tandem.operator.spec import GROUP, PLURAL, VERSION

logger = logging.getLogger(__name__)


def _apis() -> dict[str, tuple[Any, str]]:
    core, apps = client.CoreV1Api(), client.AppsV1Api()
    return {"ConfigMap": (core, "config_map"), "Secret": (core, "secret"),
            "Service": (core, "service"), "Deployment": (apps, "deployment")}


def contains(live: Any, want: Any) -> bool:
    """Whether every field of `want` has its value in `live` (lists item by item; keys only
    in `live`, the server's defaults, do not count)."""
    if isinstance(want, dict):
        return isinstance(live, dict) and all(k in live and contains(live[k], v)
                                              for k, v in want.items())
    if isinstance(want, list):
        return isinstance(live, list) and len(live) == len(want) and \
            all(contains(a, b) for a, b in zip(live, want, strict=True))
    if (isinstance(want, (int, float)) and isinstance(live, str)) or \
            (isinstance(want, str) and isinstance(live, (int, float))):
        return str(live) == str(want)
    return live == want


def read(kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    api, noun = _apis()[kind]
    try:
        obj = getattr(api, f"read_namespaced_{noun}")(name, namespace)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return api.api_client.sanitize_for_serialization(obj)


def apply(obj: dict[str, Any], namespace: str) -> str:
    """Create `obj`, or patch it back to what we built; "created", "patched" or "unchanged"."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    api, noun = _apis()[kind]
    live = read(kind, name, namespace)
    if live is None:
        try:
            getattr(api, f"create_namespaced_{noun}")(namespace, obj)
            return "created"
        except ApiException as e:
            if e.status != 409:  # 409: created meanwhile, which is what we wanted
                raise
            live = read(kind, name, namespace)
    if kind == "Secret":
        return "unchanged"
    body = {k: v for k, v in obj.items() if k in ("metadata", "spec", "data")}
    if live is not None and contains(live, body):
        return "unchanged"
    getattr(api, f"patch_namespaced_{noun}")(name, namespace, body)
    logger.info("%s %s/%s put back to its spec", kind, namespace, name)
    return "patched"


def set_replicas(name: str, namespace: str, replicas: int) -> None:
    client.AppsV1Api().patch_namespaced_deployment_scale(
        name, namespace, {"spec": {"replicas": replicas}})


def pods(namespace: str, selector: dict[str, str]) -> list[client.V1Pod]:
    text = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    return client.CoreV1Api().list_namespaced_pod(namespace, label_selector=text).items


def annotate_pod(name: str, namespace: str, annotations: dict[str, str]) -> None:
    client.CoreV1Api().patch_namespaced_pod(name, namespace,
                                            {"metadata": {"annotations": annotations}})


def delete_pod(name: str, namespace: str) -> None:
    try:
        client.CoreV1Api().delete_namespaced_pod(name, namespace)
    except ApiException as e:
        if e.status != 404:
            raise


def secret_value(name: str, namespace: str, key: str) -> str | None:
    live = read("Secret", name, namespace)
    data = (live or {}).get("data") or {}
    return base64.b64decode(data[key]).decode() if key in data else None


def read_cluster(name: str, namespace: str) -> dict[str, Any] | None:
    try:
        return client.CustomObjectsApi().get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def patch_status(name: str, namespace: str, status: dict[str, Any]) -> None:
    client.CustomObjectsApi().patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": status})
