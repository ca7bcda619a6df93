"""A real etcd + kube-apiserver on loopback for the chart and operator tests: no docker, no
kubelet, no controller-manager (so no Pod runs: the tests create Pods and read what the
operator writes).

The binaries come from `scripts/k8s/bootstrap_envtest.sh` (kube-apiserver v1.20.2 built from
Debian's sources, cached under ~/.cache/tandem-envtest); `ENVTEST_BIN` points elsewhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ENVTEST_BIN = Path(os.environ.get("ENVTEST_BIN",
                                  Path.home() / ".cache" / "tandem-envtest" / "bin"))
TOKEN = "tandem-test-admin"


def binaries() -> tuple[Path, Path] | None:
    etcd, apiserver = ENVTEST_BIN / "etcd", ENVTEST_BIN / "kube-apiserver"
    return (etcd, apiserver) if etcd.exists() and apiserver.exists() else None


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


class ControlPlane:
    def __init__(self) -> None:
        found = binaries()
        if found is None:
            raise FileNotFoundError(f"no etcd/kube-apiserver in {ENVTEST_BIN}: run "
                                    "scripts/k8s/bootstrap_envtest.sh")
        self.etcd, self.apiserver = found
        self.dir = Path(tempfile.mkdtemp(prefix="tandem-cp-"))
        self.procs: list[subprocess.Popen] = []
        self.logs: list = []
        self.kubeconfig = self.dir / "kubeconfig"

    def _certificates(self) -> None:
        d = self.dir
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                 "/CN=tandem-test-ca", "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.crt")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver",
                 "-keyout", f"{d}/server.key", "-out", f"{d}/server.csr")
        (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl("x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.crt", "-CAkey",
                 f"{d}/ca.key", "-CAcreateserial", "-days", "2", "-extfile", f"{d}/san.cnf",
                 "-out", f"{d}/server.crt")
        _openssl("genrsa", "-out", f"{d}/sa.key", "2048")
        _openssl("rsa", "-in", f"{d}/sa.key", "-pubout", "-out", f"{d}/sa.pub")
        (d / "tokens.csv").write_text(f"{TOKEN},admin,admin-uid,system:masters\n")

    def _log(self, name: str):
        log = (self.dir / name).open("w")
        self.logs.append(log)
        return log

    def start(self, timeout_s: float = 90.0) -> ControlPlane:
        started = time.monotonic()
        self._certificates()
        d, client, peer, self.port = self.dir, _port(), _port(), _port()
        self.procs.append(subprocess.Popen(
            [str(self.etcd), "--data-dir", f"{d}/etcd", "--name", "test",
             "--listen-client-urls", f"http://127.0.0.1:{client}",
             "--advertise-client-urls", f"http://127.0.0.1:{client}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"test=http://127.0.0.1:{peer}", "--unsafe-no-fsync"],
            stdout=self._log("etcd.log"), stderr=subprocess.STDOUT))
        self.procs.append(subprocess.Popen(
            [str(self.apiserver), f"--etcd-servers=http://127.0.0.1:{client}",
             "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
             f"--secure-port={self.port}", f"--cert-dir={d}/certs",
             f"--tls-cert-file={d}/server.crt", f"--tls-private-key-file={d}/server.key",
             f"--token-auth-file={d}/tokens.csv", "--authorization-mode=RBAC",
             f"--service-account-key-file={d}/sa.pub",
             f"--service-account-signing-key-file={d}/sa.key",
             f"--service-account-issuer=https://127.0.0.1:{self.port}",
             "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=true",
             "--disable-admission-plugins=ServiceAccount"],
            stdout=self._log("apiserver.log"), stderr=subprocess.STDOUT))
        context = ssl.create_default_context(cafile=str(d / "ca.crt"))
        request = urllib.request.Request(f"https://127.0.0.1:{self.port}/readyz",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        while True:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}); logs in {d}")
            try:
                with urllib.request.urlopen(request, context=context, timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"kube-apiserver not ready in {timeout_s:.0f} s; logs in {d}")
            time.sleep(0.2)
        self.startup_s = time.monotonic() - started
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: test\n  cluster: {{server: 'https://127.0.0.1:{self.port}', "
            f"certificate-authority: '{d}/ca.crt'}}\n"
            f"users:\n- name: admin\n  user: {{token: '{TOKEN}'}}\n"
            "contexts:\n- name: test\n  context: {cluster: test, user: admin, "
            "namespace: default}\ncurrent-context: test\n")
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        for log in self.logs:
            log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
