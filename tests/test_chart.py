"""The Helm chart, rendered and checked with the real helm binary: it lints strictly, renders
valid Kubernetes objects for several value sets, refuses bad values by name, follows the
cluster's PodDisruptionBudget API, and the image's pins agree with the Makefile's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tandem.operator.crd import crd

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "tandem"
BIN = Path(sys.executable).parent  # the venv's bin: make test does not put it on PATH
HELM = shutil.which("helm", path=f"{BIN}:{os.environ.get('PATH', '')}")
VALIDATE = shutil.which("kubernetes-validate", path=f"{BIN}:{os.environ.get('PATH', '')}")
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))

pytestmark = [pytest.mark.k8s, pytest.mark.skipif(
    HELM is None, reason="no helm binary (make install puts one in .venv/bin)")]

VALUE_SETS = {
    "autoscaled-gpu": ["--set", "autoscaling.enabled=true", "--set", "prefill.max=32",
                       "--set-json", 'prefill.nodeSelector={"gpu":"h200"}',
                       "--set-json", 'decode.tolerations=[{"key":"gpu","operator":"Exists"}]',
                       "--set-json", 'imagePullSecrets=["regcred"]'],
    "external-redis-tls": ["--set", "redis.enabled=false",
                           "--set", "redis.externalUrl=rediss://cache:6380/0",
                           "--set", "redis.existingPasswordSecret=cache-pass",
                           "--set", "tls.enabled=true", "--set", "tls.existingSecret=gw-tls",
                           "--set", "apiKeys.existingSecret=keys",
                           "--set", "serviceMonitor.enabled=true"],
    "cpu-offload": ["--set", "prefill.gpus=0", "--set", "decode.gpus=0",
                    "--set", "attention.replicas=2", "--set", "attention.max=4",
                    "--set", "attention.gpus=0", "--set", "dashboard.enabled=false"],
}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, *args], capture_output=True, text=True, check=check,
                          timeout=120)


def render(*args: str) -> list[dict]:
    out = helm("template", "t", str(CHART), *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_the_chart_lints_strictly():
    result = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.skipif(VALIDATE is None, reason="kubernetes-validate not installed")
@pytest.mark.parametrize("name", ["defaults", *VALUE_SETS])
def test_every_value_set_renders_valid_kubernetes_objects(name, tmp_path):
    out = helm("template", "t", str(CHART), *VALUE_SETS.get(name, [])).stdout
    (tmp_path / "all.yaml").write_text(out)
    result = subprocess.run([VALIDATE, "--strict", "-k", "1.33.0", "--quiet",
                             str(tmp_path / "all.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("setting,named", [
    ("prefill.replicas=-1", "prefill.replicas"),
    ("dtype=fp8", "dtype"),
    ("autoscaling.predictor=magic", "autoscaling.predictor"),
    ("tls.enabled=true", "tls.existingSecret"),
    ("decode.gpus=two", "decode.gpus"),
    ("unknownKey=1", "unknownKey"),
])
def test_bad_values_fail_lint_naming_the_value(setting, named):
    result = helm("lint", "--strict", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0
    assert named.split(".")[-1] in result.stdout + result.stderr


def _schema() -> dict:
    """The CRD's openAPIV3Schema as JSON Schema (OpenAPI 3.0's nullable and boolean
    exclusive bounds rewritten)."""
    def convert(node):
        if isinstance(node, list):
            return [convert(n) for n in node]
        if not isinstance(node, dict):
            return node
        out = {k: convert(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
        if out.pop("nullable", False) and "type" in out:
            out["type"] = [out["type"], "null"]
        for bound, strict in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            if out.get(strict) is True:
                out[strict] = out.pop(bound)
        return out

    schema = convert(crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])

    def closed(node):  # a structural schema prunes unknown fields; here they are errors
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for v in node.values():
                closed(v)
    closed(schema["properties"]["spec"])
    return schema


@pytest.mark.parametrize("name", ["defaults", *VALUE_SETS])
def test_the_rendered_tandemcluster_validates_against_the_crd(name):
    docs = render(*VALUE_SETS.get(name, []))
    cluster = next(d for d in docs if d["kind"] == "TandemCluster")
    jsonschema.validate(cluster, _schema())


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_the_examples_validate_against_the_crd(path):
    jsonschema.validate(yaml.safe_load(path.read_text()), _schema())


def test_an_invalid_tandemcluster_fails_the_crd_schema():
    bad = {"apiVersion": "tandem.dev/v1alpha1", "kind": "TandemCluster",
           "metadata": {"name": "x"}, "spec": {"image": "i", "slo": {"ttftSeconds": 0}}}
    with pytest.raises(jsonschema.ValidationError, match=r"less than or equal to the minimum of 0"):
        jsonschema.validate(bad, _schema())


def test_the_pdb_uses_policy_v1_where_the_cluster_has_it():
    # offline, helm's built-in API list has policy/v1; a v1.20 server (no policy/v1) gets
    # policy/v1beta1: tests/test_operator_k8s.py installs the chart on one
    pdbs = [d for d in render() if d["kind"] == "PodDisruptionBudget"]
    assert {d["apiVersion"] for d in pdbs} == {"policy/v1"}
    assert {d["metadata"]["name"] for d in pdbs} == {"t-tandem-prefill", "t-tandem-decode"}


def test_selectors_use_fixed_labels_only_and_objects_carry_the_standard_ones():
    fixed = {"app.kubernetes.io/name", "app.kubernetes.io/instance",
             "app.kubernetes.io/component"}
    for doc in render(*VALUE_SETS["autoscaled-gpu"]):
        labels = doc["metadata"].get("labels", {})
        assert {"app.kubernetes.io/name", "app.kubernetes.io/instance",
                "app.kubernetes.io/version", "app.kubernetes.io/managed-by"} <= set(labels), \
            doc["metadata"]["name"]
        selector = (doc.get("spec") or {}).get("selector")
        if isinstance(selector, dict):
            assert set(selector.get("matchLabels", selector)) <= fixed, doc["metadata"]["name"]


def test_the_dashboard_ships_as_a_configmap():
    docs = render()
    dashboard = next(d for d in docs if d["kind"] == "ConfigMap" and
                     d["metadata"]["name"].endswith("-dashboard"))
    assert dashboard["data"]["tandem.json"].strip() == \
        (CHART / "dashboards" / "tandem.json").read_text().strip()


def test_helm_test_calls_health_and_one_completion():
    hook = next(d for d in render() if d["kind"] == "Pod")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert hook["spec"]["containers"][0]["command"][:3] == ["python", "-m",
                                                            "tandem.operator.smoke"]


def test_every_value_is_documented_and_in_the_schema():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    text = (CHART / "values.yaml").read_text().splitlines()

    def walk(node, spec, path):
        for key, value in node.items():
            assert key in spec.get("properties", {}), f"{path}{key} is not in the schema"
            line = next(i for i, t in enumerate(text) if re.match(rf"\s*{key}:", t))
            assert text[line - 1].strip().startswith("# --") or \
                text[line - 1].strip().startswith("#"), f"{path}{key} has no comment"
            if isinstance(value, dict) and spec["properties"][key].get("properties"):
                walk(value, spec["properties"][key], f"{path}{key}.")

    walk(values, schema, "")


def test_the_images_pins_agree_with_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    pins = re.compile(r"([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9_.+-]*)")
    make_pins, docker_pins = dict(pins.findall(makefile)), dict(pins.findall(dockerfile))
    assert make_pins and make_pins == {k: v for k, v in docker_pins.items() if k in make_pins}
    assert set(docker_pins) == set(make_pins)
    assert "TARGET" in dockerfile and "download.pytorch.org/whl/cpu" in dockerfile
