"""Pools that follow the Ray nodes, as on Kubernetes: a real Ray head and pool nodes started
the way the pods start them (`tandem node`, each with its own POD_NAME), and `tandem serve`
with `follow_nodes` on the head. One worker per pool node: a node that joins gets one, a
worker drained by its pod's name is removed and its node gets no new one, and every worker
reports its pod in the Admin status."""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tandem.client import Client

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture
def ray_head(tmp_path):
    logs = contextlib.ExitStack()

    def log(name: str):
        return logs.enter_context((tmp_path / name).open("w"))

    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    port = _port()
    # its own temp dir: `ray start --head` records the cluster's address there, and in the
    # default one it would make every later ray.init() of this test run join this cluster
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp}"], env=env, stdout=log("head.log"),
        stderr=subprocess.STDOUT)
    procs: list[subprocess.Popen] = []

    def node(role: str, pod: str) -> subprocess.Popen:
        for attempt in range(3):  # on 2 busy cores a raylet can time out registering
            health = _port()
            proc = subprocess.Popen(
                [str(BIN / "tandem"), "node", "--role", role, "--head", f"127.0.0.1:{port}",
                 "--health-port", str(health)], env={**env, "POD_NAME": pod},
                stdout=log(f"{pod}-{attempt}.log"), stderr=subprocess.STDOUT)
            procs.append(proc)
            if _joined(proc, health):
                return proc
            proc.kill()
        raise AssertionError(f"node {pod} did not join; logs in {tmp_path}")

    def serve() -> tuple[subprocess.Popen, str]:
        config = tmp_path / "serve.yaml"
        config.write_text(
            f"follow_nodes: true\nray: {{address: '127.0.0.1:{port}'}}\n"
            "gateway: {port: 0, http_port: null}\n"
            "worker: {engine: {dtype: float32, kv_cache_gb: 0.1, num_threads: 1}, "
            "kv_transport: grpc, kv_store: {enabled: false}}\n")
        proc = subprocess.Popen([str(BIN / "tandem"), "serve", "--config", str(config)],
                                env=env, stdout=subprocess.PIPE, stderr=log("serve.log"), text=True)
        procs.append(proc)
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        line = proc.stdout.readline() if ready else ""  # "ready grpc=HOST:PORT ..." once it serves
        assert line.startswith("ready grpc="), (tmp_path / "serve.log").read_text()[-3000:]
        return proc, line.split()[1].removeprefix("grpc=")

    _wait("the Ray head", lambda: _connectable(port), 60)
    try:
        yield node, serve
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGINT if proc.args[1] == "serve" else signal.SIGTERM)
        for proc in [*reversed(procs), head]:
            if proc is head:
                head.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        logs.close()
        shutil.rmtree(temp, ignore_errors=True)


def _joined(proc: subprocess.Popen, health: int) -> bool:
    """Healthy, and still so 10 s later: a raylet that fails to register exits meanwhile."""
    deadline = time.monotonic() + 90
    while not _healthy(health):
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    steady = time.monotonic() + 10
    while time.monotonic() < steady:
        if proc.poll() is not None:
            return False
        time.sleep(0.5)
    return _healthy(health)


def _connectable(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_serve_keeps_one_worker_per_pool_node_and_drains_by_pod_name(ray_head):
    node, serve = ray_head
    node("prefill", "prefill-pod-1")
    node("decode", "decode-pod-1")
    _, address = serve()
    client = Client(address, timeout=120)
    workers = {w.pod: w for w in client.status().workers}
    assert set(workers) == {"prefill-pod-1", "decode-pod-1"}
    assert workers["decode-pod-1"].id.endswith("/decode-pod-1")
    before = client.generate("The capital of France is", max_tokens=4, temperature=0).text

    node("decode", "decode-pod-2")  # a pod joins: the head starts a worker on it
    _wait("a worker on decode-pod-2", lambda: any(
        w.pod == "decode-pod-2" and w.state == "ready" for w in client.status().workers), 120)

    reply = client.drain("decode-pod-1")  # the operator drains by pod name
    assert reply.worker_id.endswith("/decode-pod-1")
    time.sleep(5)  # two rounds of following: the drained node must not get a new worker
    states = [(w.pod, w.state) for w in client.status().workers]
    assert ("decode-pod-1", "removed") in states
    assert [s for p, s in states if p == "decode-pod-1"] == ["removed"]
    assert client.generate("The capital of France is", max_tokens=4,
                           temperature=0).text == before  # served by the worker that joined
