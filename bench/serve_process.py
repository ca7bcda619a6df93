"""`tandem serve` as a child process for the benchmarks that drive a real server (serve.py,
api.py): start it, wait for its ready line (gRPC and HTTP addresses), echo its output, stop it
cleanly; and the machine's CPU busy fraction from /proc/stat."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import IO

MODE_FLAGS = {"disagg": ["--disaggregated"], "coloc": ["--colocated"]}
READY_PREFIX = "ready grpc="
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 120.0
LOG_LOCK = threading.Lock()  # the server's output is echoed from other threads


def log(message: str) -> None:
    with LOG_LOCK:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


class Server:
    """`tandem serve` in its own session; its output is echoed to stderr (and kept, for errors)."""

    def __init__(self, mode: str, args: argparse.Namespace, decode_workers: int = 1,
                 extra: tuple[str, ...] = ()) -> None:
        self.mode = mode
        self.cmd = [sys.executable, "-m", "tandem.cli", "serve", *MODE_FLAGS[mode],
                    "--prefill-workers", "1", "--decode-workers", str(decode_workers),
                    "--grpc-port", "0", "--http-port", "0", "--dtype", args.dtype,
                    "--threads", str(args.threads), *extra]
        if args.kv_cache_gb is not None:
            self.cmd += ["--kv-cache-gb", str(args.kv_cache_gb)]
        self.proc: subprocess.Popen[str] | None = None
        self.address: str | None = None
        self.http_address: str | None = None
        self.ready = threading.Event()
        self.tail: deque[str] = deque(maxlen=80)
        self.pumps: list[threading.Thread] = []

    def _pump(self, stream: IO[str], is_stdout: bool) -> None:
        for raw in stream:
            line = raw.rstrip("\n")
            self.tail.append(line)
            if is_stdout and self.address is None and line.startswith(READY_PREFIX):
                # "ready grpc=HOST:PORT", then " http=HOST:PORT" when HTTP is served
                words = line[len(READY_PREFIX):].split()
                self.address = words[0]
                self.http_address = next((w.removeprefix("http=") for w in words[1:]
                                          if w.startswith("http=")), None)
                self.ready.set()
            log(f"  [serve {self.mode}] {line}")

    def start(self, timeout: float = START_TIMEOUT_S) -> str:
        """Start the server and wait for its `ready grpc=` line; its gRPC address."""
        env = dict(os.environ, RAY_AUTH_MODE="disabled", TOKENIZERS_PARALLELISM="false")
        log(f"{self.mode}: starting {' '.join(self.cmd[1:])}")
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1, env=env, start_new_session=True)
        for stream, is_stdout in ((self.proc.stdout, True), (self.proc.stderr, False)):
            assert stream is not None
            thread = threading.Thread(target=self._pump, args=(stream, is_stdout), daemon=True)
            thread.start()
            self.pumps.append(thread)
        started = time.monotonic()
        next_note = started + 15
        while not self.ready.wait(0.5):
            now = time.monotonic()
            if self.proc.poll() is not None:
                for thread in self.pumps:
                    thread.join(5)
                output = "\n".join(self.tail)
                raise RuntimeError(f"{self.mode}: the server exited with code "
                                   f"{self.proc.returncode} before it was ready; its last "
                                   f"output:\n{output}")
            if now - started > timeout:
                raise RuntimeError(f"{self.mode}: the server was not ready in {timeout:.0f} s")
            if now >= next_note:
                log(f"{self.mode}: waiting for the server ({now - started:.0f} s)")
                next_note = now + 15
        assert self.address is not None
        log(f"{self.mode}: ready at {self.address} after {time.monotonic() - started:.1f} s")
        return self.address

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGINT, wait for a clean exit, kill its process group if it hangs; the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            log(f"{self.mode}: stopping the server (SIGINT)")
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.mode}: no exit {timeout:.0f} s after SIGINT; killing its group")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for thread in self.pumps:
            thread.join(5)
        log(f"{self.mode}: server exited with code {proc.returncode}")
        return proc.returncode


def cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user and nice
    return total - idle, total


def busy_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def measure_idle_busy(seconds: float = 1.0) -> float | None:
    before = cpu_jiffies()
    time.sleep(seconds)
    return busy_fraction(before, cpu_jiffies())
