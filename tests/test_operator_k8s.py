"""The chart and the operator against a real kube-apiserver + etcd (v1.20, no kubelet).

No Pod runs here: a "kubelet" thread in the test plays the ReplicaSets' part (it creates Ready
pods up to each pool Deployment's count and deletes the pods the operator marked), and the
test serves the gateway the operator talks to: a real metrics page (a burst, then quiet) and
a gRPC Admin service that records every drain. The operator itself runs for real, under
`kopf.testing.KopfRunner`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client import generate_latest

from tests.k8s.controlplane import ControlPlane, binaries

pytestmark = [pytest.mark.k8s, pytest.mark.skipif(
    binaries() is None, reason="no kube-apiserver (make envtest builds one)")]

kubernetes = pytest.importorskip("kubernetes")
kopf = pytest.importorskip("kopf")
from kopf.testing import KopfRunner  # noqa: E402
from kubernetes import client  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from tandem.cluster.metrics import ClusterMetrics  # noqa: E402
from tandem.cluster.profile import DecodePoint, PrefillPoint, ReplicaProfile  # noqa: E402
from tandem.operator.main import register  # noqa: E402
from tandem.operator.pods import DELETION_COST, DRAINED  # noqa: E402
from tandem.operator.reconcile import Operator  # noqa: E402
from tandem.operator.settings import OperatorSettings  # noqa: E402
from tandem.proto.v1 import admin_pb2 as apb  # noqa: E402
from tandem.proto.v1 import admin_pb2_grpc as apb_grpc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HELM = shutil.which("helm", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
GROUP, VERSION, PLURAL = "tandem.dev", "v1alpha1", "tandemclusters"


def wait_for(what: str, check, timeout_s: float = 60.0, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every_s)


@pytest.fixture(scope="module")
def cluster():
    plane = ControlPlane().start()
    os.environ["KUBECONFIG"] = str(plane.kubeconfig)
    kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(plane.kubeconfig)
    kubernetes.config.load_kube_config(str(plane.kubeconfig))
    try:
        yield plane
    finally:
        plane.stop()


def namespace(name: str) -> str:
    client.CoreV1Api().create_namespace({"metadata": {"name": name}})
    return name


def helm(plane: ControlPlane, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(HELM), "--kubeconfig", str(plane.kubeconfig), *args],
                          capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.skipif(HELM is None, reason="no helm binary")
def test_helm_installs_and_upgrades_the_chart_and_the_crd_refuses_bad_objects(cluster):
    ns = namespace("chart")
    helm(cluster, "install", "demo", str(ROOT / "helm" / "tandem"), "-n", ns,
         "--set", "prefill.replicas=2", "--set", "prefill.gpus=0")
    crd = client.ApiextensionsV1Api().read_custom_resource_definition(f"{PLURAL}.{GROUP}")
    assert {c.type: c.status for c in crd.status.conditions}["Established"] == "True"
    objects = client.CustomObjectsApi()
    body = objects.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "demo-tandem")
    assert body["spec"]["pools"]["prefill"]["replicas"] == 2
    assert body["spec"]["autoscaling"]["scaleDownStep"] == 0.02  # the CRD's defaults
    assert client.AppsV1Api().read_namespaced_deployment("demo-tandem-operator", ns)
    assert client.AppsV1Api().read_namespaced_stateful_set("demo-tandem-redis", ns)
    # v1.20 has no policy/v1: the chart asked the server and wrote policy/v1beta1
    manifest = helm(cluster, "get", "manifest", "demo", "-n", ns).stdout
    pdbs = [d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "PodDisruptionBudget"]
    assert {(d["apiVersion"], d["metadata"]["name"]) for d in pdbs} == {
        ("policy/v1beta1", "demo-tandem-prefill"), ("policy/v1beta1", "demo-tandem-decode")}
    password = client.CoreV1Api().read_namespaced_secret("demo-tandem-redis", ns).data
    helm(cluster, "upgrade", "demo", str(ROOT / "helm" / "tandem"), "-n", ns,
         "--set", "prefill.replicas=3", "--set", "prefill.gpus=0",
         "--set", "autoscaling.enabled=true")
    body = objects.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "demo-tandem")
    assert body["spec"]["pools"]["prefill"]["replicas"] == 3
    assert body["spec"]["autoscaling"]["enabled"] is True
    # the generated Redis password survives the upgrade
    assert client.CoreV1Api().read_namespaced_secret("demo-tandem-redis", ns).data == password

    bad = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TandemCluster",
           "metadata": {"name": "bad"},
           "spec": {"image": "x", "slo": {"ttftSeconds": -1},
                    "autoscaling": {"predictor": "magic"}}}
    with pytest.raises(ApiException) as refused:
        objects.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, bad)
    assert refused.value.status == 422
    assert "spec.slo.ttftSeconds" in refused.value.body
    assert "spec.autoscaling.predictor" in refused.value.body


# -- the operator -------------------------------------------------------------------------------


class Gateway:
    """What the operator reads and calls: a real metrics page and an Admin service that
    records drains (and what the pod and the Deployment looked like at that moment)."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.metrics = ClusterMetrics("m")
        self.rate = 0.0  # requests per second the load thread adds
        self.drains: list[dict] = []
        self._stop = threading.Event()
        page = self

        class Page(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = generate_latest(page.metrics.registry)
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.grpc = grpc.server(futures.ThreadPoolExecutor(4))
        apb_grpc.add_AdminServicer_to_server(self, self.grpc)
        self.grpc_port = self.grpc.add_insecure_port("127.0.0.1:0")
        for target in (self.http.serve_forever, self._load):
            threading.Thread(target=target, daemon=True).start()
        self.grpc.start()

    def _load(self) -> None:
        m = self.metrics
        while not self._stop.wait(0.1):
            for _ in range(round(self.rate * 0.1)):
                m.labels(m.requests_received).inc()
                m.labels(m.prompt_tokens_received).inc(1000)
                m.labels(m.generation_tokens).inc(50)
                m.labels(m.ttft).observe(0.3)
                m.labels(m.itl).observe(0.02)

    def Status(self, request, context) -> apb.StatusResponse:
        pods = client.CoreV1Api().list_namespaced_pod(self.ns).items
        return apb.StatusResponse(model="m", workers=[
            apb.WorkerStatus(id=f"{p.metadata.labels['app.kubernetes.io/component']}@"
                             f"{p.metadata.name}", pod=p.metadata.name, state="ready",
                             open_requests=i % 3) for i, p in enumerate(pods)])

    def Drain(self, request, context) -> apb.DrainResponse:
        pod = client.CoreV1Api().read_namespaced_pod(request.worker_id, self.ns)
        role = pod.metadata.labels["app.kubernetes.io/component"]
        replicas = client.AppsV1Api().read_namespaced_deployment(
            f"c-{role}", self.ns).spec.replicas
        self.drains.append({"pod": request.worker_id, "role": role, "replicas": replicas,
                            "annotations": dict(pod.metadata.annotations or {})})
        time.sleep(0.2)  # its streams move
        return apb.DrainResponse(worker_id=request.worker_id, moved_requests=2)

    def close(self) -> None:
        self._stop.set()
        self.http.shutdown()
        self.grpc.stop(0)


class Kubelet:
    """The ReplicaSets' and kubelets' part: Ready pods up to each Deployment's count; the pods
    the operator marked are deleted (as a ReplicaSet scaling down would)."""

    def __init__(self, ns: str, roles: tuple[str, ...]) -> None:
        self.ns, self.roles = ns, roles
        self.stuck: set[str] = set()  # roles whose new pods stay Pending
        self.created = 0
        self.removed_marked: list[str] = []  # pods deleted because the operator marked them
        self.removed_other: list[str] = []  # pods deleted to meet a lower count otherwise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        core, apps = client.CoreV1Api(), client.AppsV1Api()
        while not self._stop.wait(0.3):
            for role in self.roles:
                try:
                    want = apps.read_namespaced_deployment(f"c-{role}", self.ns).spec.replicas
                except ApiException:
                    continue
                selector = f"app.kubernetes.io/instance=c,app.kubernetes.io/component={role}"
                pods = core.list_namespaced_pod(self.ns, label_selector=selector).items
                live = []
                for pod in pods:
                    if (pod.metadata.annotations or {}).get(DRAINED):
                        core.delete_namespaced_pod(pod.metadata.name, self.ns)
                        self.removed_marked.append(pod.metadata.name)
                    else:
                        live.append(pod)
                for _ in range(want - len(live)):
                    self._create(core, role)
                for pod in live[want:] if len(live) > want else []:
                    core.delete_namespaced_pod(pod.metadata.name, self.ns)
                    self.removed_other.append(pod.metadata.name)

    def _create(self, core, role: str) -> None:
        self.created += 1
        name = f"c-{role}-{self.created}"
        core.create_namespaced_pod(self.ns, {
            "metadata": {"name": name, "labels": {
                "app.kubernetes.io/name": "tandem", "app.kubernetes.io/instance": "c",
                "app.kubernetes.io/component": role}},
            "spec": {"containers": [{"name": role, "image": "tandem:test"}]}})
        if role not in self.stuck:
            core.patch_namespaced_pod_status(name, self.ns, {"status": {"conditions": [
                {"type": "Ready", "status": "True"}]}})

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_the_operator_sizes_the_pools_drains_before_scaling_down_and_writes_status(
        cluster, tmp_path):
    ns = namespace("op")
    crd = yaml.safe_load((ROOT / "helm" / "tandem" / "crds" / "tandemcluster.yaml").read_text())
    try:
        client.ApiextensionsV1Api().create_custom_resource_definition(crd)
    except ApiException as e:
        assert e.status == 409  # the chart test installed it already
    wait_for("the CRD established", lambda: any(
        c.type == "Established" and c.status == "True" for c in client.ApiextensionsV1Api()
        .read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or []))
    profile = tmp_path / "profile.json"
    profile.write_text(ReplicaProfile(
        model="test", device="cpu",
        prefill=[PrefillPoint(prompt_tokens=128, tokens_per_s=4000),
                 PrefillPoint(prompt_tokens=4096, tokens_per_s=4000)],
        decode=[DecodePoint(batch=b, context=1024, step_s=0.010 + 0.001 * b) for b in (1, 64)],
        kv_capacity_tokens=200_000).model_dump_json())
    gateway = Gateway(ns)
    settings = OperatorSettings(namespaces=[ns], gateway_http=f"http://127.0.0.1:"
                                f"{gateway.http.server_address[1]}",
                                gateway_grpc=f"127.0.0.1:{gateway.grpc_port}", drain_timeout_s=10)
    registry = kopf.OperatorRegistry()
    register(Operator(settings), registry)
    kubelet = Kubelet(ns, ("prefill", "decode"))
    objects = client.CustomObjectsApi()
    apps = client.AppsV1Api()
    transcript: list[str] = []

    def replicas(role: str) -> int:
        return apps.read_namespaced_deployment(f"c-{role}", ns).spec.replicas

    def status() -> dict:
        return objects.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "c").get(
            "status") or {}

    def note(moment: str) -> None:
        s = status()
        transcript.append(f"{moment}: replicas prefill {replicas('prefill')}, decode "
                          f"{replicas('decode')}; status pools {s.get('pools')}; "
                          f"reasons {s.get('lastDecision', {}).get('reasons')}")

    try:
        with KopfRunner(["run", "--standalone", "--namespace", ns], registry=registry,
                        timeout=120) as runner:
            created = time.monotonic()
            objects.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "TandemCluster",
                "metadata": {"name": "c"},
                "spec": {"image": "tandem:test", "pools": {
                    "prefill": {"replicas": 1, "min": 1, "max": 3, "gpus": 0},
                    "decode": {"replicas": 1, "min": 1, "max": 3, "gpus": 0}},
                    "autoscaling": {"enabled": True, "intervalSeconds": 1,
                                    "scaleDownWindowSeconds": 3, "scaleDownStep": 1,
                                    "pendingTimeoutSeconds": 4, "profile": str(profile)}}})
            # 1. the objects, owned by the cluster
            wait_for("the pool deployments", lambda: all(
                _exists(apps.read_namespaced_deployment, f"c-{r}", ns)
                for r in ("head", "prefill", "decode")))
            reconcile_s = time.monotonic() - created
            head = apps.read_namespaced_deployment("c-head", ns)
            assert head.metadata.owner_references[0].kind == "TandemCluster"
            assert client.CoreV1Api().read_namespaced_service("c-head", ns)
            assert client.CoreV1Api().read_namespaced_config_map("c-config", ns)
            assert client.CoreV1Api().read_namespaced_secret("c-ray-token", ns)
            note("created")
            # 2. a burst: 20 req/s of 1,000 prompt tokens -> prefill to its max, decode to 2
            gateway.rate = 20
            wait_for("prefill scaled up", lambda: replicas("prefill") == 3, 60)
            wait_for("decode scaled up", lambda: replicas("decode") == 2, 60)
            wait_for("the status", lambda: status().get("pools", {}).get("prefill", {})
                     .get("ready") == 3, 30)
            note("burst")
            s = status()
            assert s["observedGeneration"] == 1
            assert s["observed"]["requestsPerSecond"] > 0
            assert "prompt tok/s" in s["lastDecision"]["reasons"]["prefill"]
            assert {c["type"] for c in s["conditions"]} == {"Ready", "Scaling", "Degraded"}
            # 3. quiet: back to one each, every removal drained first
            gateway.rate = 0
            wait_for("prefill scaled down", lambda: replicas("prefill") == 1, 60)
            wait_for("decode scaled down", lambda: replicas("decode") == 1, 60)
            note("quiet")
            drained = {d["pod"] for d in gateway.drains}
            assert len([d for d in gateway.drains if d["role"] == "prefill"]) == 2
            assert len([d for d in gateway.drains if d["role"] == "decode"]) == 1
            for d in gateway.drains:  # drained while still counted and not yet marked
                assert DELETION_COST not in d["annotations"]
                assert d["replicas"] >= 2, d
            wait_for("marked pods deleted by the kubelet", lambda: not _marked(ns))
            # exactly the drained pods were marked, and no other pod went
            assert set(kubelet.removed_marked) == drained and kubelet.removed_other == []
            # 4. a hand edit of a Deployment is put back
            edited = time.monotonic()
            apps.patch_namespaced_deployment("c-decode", ns, {"spec": {"replicas": 3}})
            wait_for("the decode deployment restored", lambda: replicas("decode") == 1, 30)
            restore_s = time.monotonic() - edited
            # 5. a pod that stays Pending is given up after pendingTimeoutSeconds
            kubelet.stuck.add("decode")
            gateway.rate = 20
            wait_for("a pending decode pod", lambda: _pending(ns, "decode"), 30)
            stuck_pod = _pending(ns, "decode")[0]
            wait_for("the pending pod given up", lambda: stuck_pod not in _pending(ns, "decode")
                     and "given up" in _condition(status(), "Degraded").get("message", ""), 60)
            note("pending")
            gateway.rate = 0
            # 6. a spec the schema allows but that cannot run: a permanent error, in the status
            objects.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "TandemCluster",
                "metadata": {"name": "bad"},
                "spec": {"image": "x", "pools": {"decode": {"min": 4, "max": 2}}}})
            error = wait_for("the permanent error in the status", lambda: (
                objects.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "bad")
                .get("status") or {}).get("error"), 30)
            assert "spec.pools.decode" in error and "min (4) exceeds max (2)" in error
            assert not _exists(apps.read_namespaced_deployment, "bad-decode", ns)
            runner.timeout = 30
        assert runner.exit_code == 0, runner.output
    finally:
        kubelet.close()
        gateway.close()
    print(f"\nreconcile latency: created -> deployments in {reconcile_s:.2f} s; "
          f"hand edit -> restored in {restore_s:.2f} s")
    print("\n".join(transcript))


def _exists(read, name: str, ns: str) -> bool:
    try:
        read(name, ns)
        return True
    except ApiException:
        return False


def _marked(ns: str) -> list[str]:
    return [p.metadata.name for p in client.CoreV1Api().list_namespaced_pod(ns).items
            if (p.metadata.annotations or {}).get(DRAINED)]


def _pending(ns: str, role: str) -> list[str]:
    selector = f"app.kubernetes.io/instance=c,app.kubernetes.io/component={role}"
    return [p.metadata.name for p in client.CoreV1Api().list_namespaced_pod(
        ns, label_selector=selector).items if not p.status.conditions
        and p.metadata.deletion_timestamp is None]


def _condition(status: dict, kind: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})
