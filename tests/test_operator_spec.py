"""The TandemCluster spec and what the operator builds from it, without a cluster: the spec
maps one to one onto ServeConfig and the autoscaler's keys (a test fails when they drift), the
CRD in the chart is the one the models generate, and the builders write what the pods need."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from tandem.cluster.autoscaler import AutoscaleConfig
from tandem.cluster.config import ServeConfig
from tandem.operator import builders
from tandem.operator.crd import crd_yaml
from tandem.operator.errors import SpecInvalid
from tandem.operator.reconcile import load_profile, parse_spec
from tandem.operator.spec import (
    MAPPING,
    POD_FIELDS,
    TandemClusterSpec,
    autoscale_config,
    serve_config_data,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))


def _leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        inner = field.annotation
        args = getattr(inner, "__args__", ())
        nested = next((a for a in (inner, *args) if isinstance(a, type)
                       and issubclass(a, BaseModel)), None)
        out += _leaves(nested, path + ".") if nested else [path]
    return out


def _resolves(model: type[BaseModel], dotted: str) -> bool:
    for part in dotted.split("."):
        field = model.model_fields.get(part)
        if field is None:
            return False
        inner = field.annotation
        args = getattr(inner, "__args__", ())
        model = next((a for a in (inner, *args) if isinstance(a, type)
                      and issubclass(a, BaseModel)), None)  # type: ignore[assignment]
        if model is None:
            return part == dotted.split(".")[-1]
    return True


def test_every_spec_field_maps_to_a_serve_config_key_or_the_pods():
    pod_patterns = [p.replace(".", r"\.").replace("*", r"[a-z]+") for p in POD_FIELDS]
    unmapped = [leaf for leaf in _leaves(TandemClusterSpec) if leaf not in MAPPING
                and not any(re.fullmatch(p, leaf) for p in pod_patterns)]
    assert unmapped == []
    broken = [target for target in MAPPING.values() if not _resolves(ServeConfig, target)]
    assert broken == []


def test_every_autoscaler_key_is_in_the_crd_one_to_one():
    targets = {t.removeprefix("autoscale.") for t in MAPPING.values()
               if t.startswith("autoscale.")}
    assert targets == set(AutoscaleConfig.model_fields)
    spec = TandemClusterSpec.model_validate({
        "image": "x", "autoscaling": {"enabled": True, "intervalSeconds": 3,
                                      "scaleDownStep": 0.5, "predictor": "ewma"}})
    config = autoscale_config(spec)
    assert (config.interval_s, config.scale_down_step, config.predictor) == (3, 0.5, "ewma")


def test_the_head_config_is_a_valid_serve_config_with_the_spec_values():
    spec = TandemClusterSpec.model_validate({
        "image": "x", "dtype": "float32", "kvTransport": "grpc",
        "pools": {"prefill": {"replicas": 3, "min": 2, "max": 8}, "decode": {"replicas": 2}},
        "slo": {"ttftSeconds": 1.5}, "store": {"redisUrl": "redis://r:6379/0"}})
    config = ServeConfig.model_validate(serve_config_data(spec))
    assert config.prefill_workers == 3 and config.decode_workers == 2
    assert config.pools.prefill.min == 2 and config.pools.prefill.max == 8
    assert config.slo.ttft_s == 1.5 and config.worker.engine.dtype == "float32"
    assert config.worker.kv_transport == "grpc" and config.follow_nodes
    assert config.worker.kv_store.redis.url == "redis://r:6379/0"
    assert not config.autoscale.enabled  # the operator runs the policy, not the head
    assert config.ray.address == "auto" and config.gateway.host == "0.0.0.0"


def test_the_chart_ships_the_crd_the_models_generate():
    shipped = (ROOT / "helm" / "tandem" / "crds" / "tandemcluster.yaml").read_text()
    assert shipped == crd_yaml(), "regenerate: python -m tandem.operator.crd > " \
        "helm/tandem/crds/tandemcluster.yaml"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_the_examples_parse_as_specs(path):
    body = yaml.safe_load(path.read_text())
    assert body["kind"] == "TandemCluster"
    parse_spec(body["spec"])


def test_a_spec_the_schema_allows_but_that_cannot_run_is_refused_by_name():
    with pytest.raises(SpecInvalid, match=r"spec\.pools\.decode"):
        parse_spec({"image": "x", "pools": {"decode": {"min": 5, "max": 2}}})
    with pytest.raises(SpecInvalid, match=r"spec\.autoscaling\.profile"):
        load_profile("/nonexistent/profile.json")


def test_the_shipped_profile_loads_from_its_relative_path():
    assert load_profile(TandemClusterSpec(image="x").autoscaling.profile).device == "H200"


def test_pool_pods_carry_probes_shm_gpus_placement_and_their_own_name():
    spec = TandemClusterSpec.model_validate({
        "image": "img:1", "imagePullSecrets": ["pull"],
        "pools": {"decode": {"gpus": 2, "nodeSelector": {"gpu": "h200"},
                             "tolerations": [{"key": "gpu", "operator": "Exists"}],
                             "affinity": {"podAntiAffinity": {}},
                             "resources": {"requests": {"memory": "64Gi"}}}}})
    d = builders.pool_deployment("c", spec, "decode", 3)
    pod = d["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert d["spec"]["replicas"] == 3
    assert d["spec"]["selector"]["matchLabels"] == builders.selector("c", "decode")
    assert set(builders.selector("c", "decode")) == {
        "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["resources"] == {"requests": {"memory": "64Gi"},
                                      "limits": {"nvidia.com/gpu": "2"}}
    assert pod["nodeSelector"] == {"gpu": "h200"} and pod["tolerations"][0]["key"] == "gpu"
    assert pod["affinity"] == {"podAntiAffinity": {}}
    assert pod["imagePullSecrets"] == [{"name": "pull"}]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "c-ray-token"
    assert container["command"][:4] == ["tandem", "node", "--role", "decode"]


def test_the_head_mounts_its_config_and_tls_and_rolls_when_the_config_changes():
    spec = TandemClusterSpec.model_validate({"image": "i", "tls": {"secretName": "t"},
                                             "apiKeySecret": "keys"})
    head = builders.head_deployment("c", spec)
    pod = head["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": "t"}} in pod["volumes"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["TANDEM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "keys",
                                                                  "key": "api-keys"}
    other = builders.head_deployment("c", spec.model_copy(update={"dtype": "float32"}))
    annotation = "tandem.dev/config-hash"
    assert head["spec"]["template"]["metadata"]["annotations"][annotation] != \
        other["spec"]["template"]["metadata"]["annotations"][annotation]
    config = yaml.safe_load(builders.config_map("c", spec)["data"]["serve.yaml"])
    assert config["gateway"]["tls"]["cert"] == "/etc/tandem/tls/tls.crt"


def test_owned_objects_point_at_their_cluster():
    owner = {"apiVersion": "tandem.dev/v1alpha1", "kind": "TandemCluster",
             "metadata": {"name": "c", "uid": "u-1"}}
    obj = builders.owned(builders.head_service("c"), owner)
    ref = obj["metadata"]["ownerReferences"][0]
    assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
        "TandemCluster", "c", "u-1", True)
