"""`tandem node`: a pool pod's process on Kubernetes.

It joins the head's Ray cluster advertising one unit of its pool's resource (`tandem_prefill`,
`tandem_decode` or `tandem_memory`), so the head's pool manager starts one worker on it, and
serves `/health` for the pod's probes: 200 while its Ray node runs, 503 once it has stopped (the
pod then restarts). SIGTERM stops the Ray node; the operator drains a pod's worker before it
scales the pool down, so by then the node holds no stream.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

logger = logging.getLogger(__name__)

POOL_RESOURCES = {"prefill": "tandem_prefill", "decode": "tandem_decode",
                  "colocated": "tandem_colocated", "attention": "tandem_memory"}


def ray_start_command(role: str, head: str, num_cpus: int | None = None) -> list[str]:
    if role not in POOL_RESOURCES:
        raise ValueError(f"role: {role!r} is not a pool ({', '.join(POOL_RESOURCES)})")
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")  # venv not on PATH
    command = [ray, "start", f"--address={head}", "--block", "--disable-usage-stats",
               f"--resources={json.dumps({POOL_RESOURCES[role]: 1})}"]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    return command


class _Health(BaseHTTPRequestHandler):
    node: subprocess.Popen | None = None

    def do_GET(self) -> None:
        if self.path != "/health":
            self.send_error(404, "only /health is served here")
            return
        alive = self.node is not None and self.node.poll() is None
        body = json.dumps({"status": "ok" if alive else "ray node stopped"}).encode()
        self.send_response(200 if alive else 503)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # probes every 10 s: quiet
        logger.debug("health: " + format, *args)


def run_node(role: str, head: str, health_port: int, num_cpus: int | None = None) -> int:
    """Run the Ray node until it stops or SIGTERM; its exit status."""
    command = ray_start_command(role, head, num_cpus)
    logger.info("joining %s as a %s node: %s", head, role, " ".join(command))
    node = subprocess.Popen(command)
    _Health.node = node
    server = ThreadingHTTPServer(("0.0.0.0", health_port), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(signum: int, frame: object) -> None:
        logger.info("SIGTERM: stopping the Ray node")
        node.terminate()

    signal.signal(signal.SIGTERM, stop)
    try:
        code = node.wait()
    finally:
        server.shutdown()
    logger.info("the Ray node stopped (exit %d)", code)
    return code
