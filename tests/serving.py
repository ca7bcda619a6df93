"""Test harness: a real `TandemServer` (Ray workers + gRPC gateway) on its own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import ray

from tandem.cluster.config import ServeConfig
from tandem.cluster.server import TandemServer
from tandem.worker_base import WorkerStats

START_TIMEOUT_S = 600


@contextlib.contextmanager
def tandem_faults(spec: str):
    """TANDEM_FAULTS set to `spec` while a server starts (its workers inherit it), then put back."""
    previous = os.environ.get("TANDEM_FAULTS")
    os.environ["TANDEM_FAULTS"] = spec
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TANDEM_FAULTS"]
        else:
            os.environ["TANDEM_FAULTS"] = previous


class ServerThread:
    """Runs the server the way `tandem serve` does, on an event loop in a background thread."""

    def __init__(self, config: ServeConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = TandemServer(config)
        self.address = self.run(self.server.start(), START_TIMEOUT_S)
        self.http_url = f"http://{self.server.http_address}" if self.server.http_address \
            else None

    def run(self, coro, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def workers(self) -> list[Any]:
        return self.server.prefill_workers + self.server.decode_workers

    def stats(self) -> list[WorkerStats]:
        return ray.get([w.stats.remote() for w in self.workers], timeout=30)

    def wait_until(self, predicate: Callable[[list[WorkerStats]], bool],
                   timeout: float = 30) -> list[WorkerStats]:
        """Poll the workers' stats until `predicate` holds; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not reached in {timeout} s; stats: {stats}")
            time.sleep(0.1)

    def wait_idle(self, timeout: float = 30) -> list[WorkerStats]:
        """Every worker has all its KV blocks free and tracks no request."""
        return self.wait_until(lambda stats: all(
            s.engine.num_free_blocks == s.engine.num_blocks and s.num_open_requests == 0
            and s.engine.num_running == s.engine.num_waiting == s.engine.num_reserved == 0
            for s in stats), timeout)

    def close(self) -> None:
        """Stop the server (a second call does nothing)."""
        if not self.thread.is_alive():
            return
        try:
            self.run(self.server.stop(), 120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
