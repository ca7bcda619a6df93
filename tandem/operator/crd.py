"""The TandemCluster CRD, generated from the spec models so that schema and parser agree.

`python -m tandem.operator.crd` prints it; the chart ships the output
(`helm/tandem/crds/tandemcluster.yaml`) and a test fails when the two differ.
The pydantic JSON schema becomes a structural OpenAPI v3.0 schema: references inlined,
`Optional` as `nullable`, exclusive bounds in v3.0's boolean form, free-form Kubernetes
fragments (tolerations, affinity) kept with `x-kubernetes-preserve-unknown-fields`, and
`default: {}` on nested objects so the API server fills their defaults in too.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from pydantic import BaseModel

from tandem.operator.spec import GROUP, KIND, PLURAL, VERSION, TandemClusterSpec

CONDITIONS = ("Ready", "Scaling", "Degraded")


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:  # Optional[X]: X, nullable
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"crd: cannot express {node} structurally")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        out = _structural({**options[0], **rest}, defs)
        out["nullable"] = True
        return out
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "additionalProperties", "properties", "items", "required",
                   "const", "$defs"):
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
            continue
        out[key] = value
    if "const" in node:
        out["enum"] = [node["const"]]
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if node.get("type") == "object" or "properties" in node:
        out["type"] = "object"
        if "properties" in node:
            out["properties"] = {name: _structural(prop, defs)
                                 for name, prop in node["properties"].items()}
            for prop in out["properties"].values():
                if "default" in prop and prop["default"] is None:
                    del prop["default"]  # nullable already says it may be absent
            if node.get("required"):
                out["required"] = list(node["required"])
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            if extra.get("type") in ("string", "number", "integer", "boolean"):
                out["additionalProperties"] = _structural(extra, defs)
            else:
                out["x-kubernetes-preserve-unknown-fields"] = True
        elif isinstance(extra, dict) or (extra is True):
            out["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("type") == "array":
        item = node.get("items", {})
        out["items"] = _structural(item, defs) if item.get("type") not in (None, "object") \
            or "properties" in item or "$ref" in item else \
            {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return out


def _nested_defaults(node: dict[str, Any], model: type[BaseModel]) -> None:
    """Each nested model's default, as the model builds it, so the API server fills in what
    the parser would (a pool's own defaults differ from another's)."""
    for name, field in model.model_fields.items():
        inner = field.annotation
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            continue
        prop = node["properties"][field.alias or name]
        if field.default_factory is not None:
            prop["default"] = field.default_factory().model_dump(  # type: ignore[call-arg]
                by_alias=True, exclude_none=True, mode="json")
        _nested_defaults(prop, inner)


def spec_schema() -> dict[str, Any]:
    raw = TandemClusterSpec.model_json_schema(by_alias=True)
    schema = _structural(raw, raw.get("$defs", {}))
    _nested_defaults(schema, TandemClusterSpec)
    return schema


def status_schema() -> dict[str, Any]:
    pool = {"type": "object", "properties": {
        "desired": {"type": "integer"}, "current": {"type": "integer"},
        "ready": {"type": "integer"}, "pending": {"type": "integer"}}}
    condition = {"type": "object", "required": ["type", "status"], "properties": {
        "type": {"type": "string", "enum": list(CONDITIONS)},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": {"type": "string"}, "message": {"type": "string"},
        "lastTransitionTime": {"type": "string"}}}
    return {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {
        "observedGeneration": {"type": "integer"},
        "pools": {"type": "object", "properties": {
            role: pool for role in ("prefill", "decode", "attention")}},
        "observed": {"type": "object", "properties": {
            "ttftSeconds": {"type": "number", "nullable": True},
            "itlSeconds": {"type": "number", "nullable": True},
            "requestsPerSecond": {"type": "number"}}},
        "lastDecision": {"type": "object", "properties": {
            "time": {"type": "string"},
            "reasons": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "error": {"type": "string"},
        "conditions": {"type": "array", "items": condition}}}


def crd() -> dict[str, Any]:
    column = [("Prefill", ".status.pools.prefill.ready"), ("Decode", ".status.pools.decode.ready"),
              ("Attention", ".status.pools.attention.ready"),
              ("Ready", '.status.conditions[?(@.type=="Ready")].status')]
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP, "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": KIND.lower(),
                      "shortNames": ["tc"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    *({"name": n, "type": "string", "jsonPath": p} for n, p in column),
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
                "schema": {"openAPIV3Schema": {
                    "type": "object", "required": ["spec"],
                    "description": "A Tandem inference cluster: gateway, prefill, decode and "
                                   "attention pools, sized by the operator.",
                    "properties": {
                        "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema(), "status": status_schema()}}},
            }],
        },
    }


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def crd_yaml() -> str:
    header = "# Generated by `python -m tandem.operator.crd` from tandem/operator/spec.py.\n"
    return header + yaml.dump(crd(), Dumper=_NoAliases, sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(crd_yaml())
