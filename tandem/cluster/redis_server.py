"""`RedisServer`: a local redis-server for the cluster's shared KV tier (and for tests).

Started on 127.0.0.1 with a free port, no persistence, `maxmemory` with LRU eviction; stopped
with the cluster. `tandem serve` starts one when the store has no Redis URL and redis-server is
installed (`apt-get install redis-server`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def find_redis_server() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, maxmemory_bytes: int, password: str | None = None,
                 port: int | None = None, tls: tuple[str, str] | None = None) -> None:
        """`tls`: (certificate, key) PEM files: serve TLS only (clients use rediss://)."""
        binary = find_redis_server()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.binary, self.maxmemory_bytes, self.password = binary, maxmemory_bytes, password
        self.tls = tls
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="tandem-redis-")
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start (or restart) the server; returns once it answers PING."""
        ports = ["--port", str(self.port)]
        if self.tls:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls[0],
                     "--tls-key-file", self.tls[1], "--tls-auth-clients", "no"]
        args = [self.binary, "--bind", "127.0.0.1", *ports, "--save", "",
                "--appendonly", "no", "--dir", self._dir.name,
                "--maxmemory", str(self.maxmemory_bytes), "--maxmemory-policy", "allkeys-lru"]
        if self.password:
            args += ["--requirepass", self.password]
        log = open(Path(self._dir.name) / "redis.log", "ab")  # noqa: SIM115 (child owns it)
        with log:
            self._process = subprocess.Popen(args, stdout=log, stderr=log,
                                             preexec_fn=_die_with_parent)
        client = redis.Redis.from_url(self.url, password=self.password, socket_timeout=1.0,
                                      socket_connect_timeout=1.0,
                                      **({"ssl_ca_certs": self.tls[0]} if self.tls else {}))
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                if self._process.poll() is not None:
                    error = (Path(self._dir.name) / "redis.log").read_text(errors="replace")
                    raise RuntimeError(f"redis-server exited at start: {error[-500:]}")
                try:
                    client.ping()
                    break
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise TimeoutError(f"redis-server on port {self.port} did not answer "
                                           f"within {START_TIMEOUT_S} s") from None
                    time.sleep(0.05)
        finally:
            client.close()
        logger.info("redis-server on 127.0.0.1:%d (maxmemory %.2f GiB)", self.port,
                    self.maxmemory_bytes / 2**30)
        return self

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()
