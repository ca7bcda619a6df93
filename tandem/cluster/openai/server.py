"""`HttpServer`: uvicorn serving the HTTP API on the gateway's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from tandem.tls import GatewayTLS

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # `tandem serve` owns SIGINT/SIGTERM: it stops this server itself


class HttpServer:
    def __init__(self, app: FastAPI, host: str, port: int, tls: GatewayTLS | None,
                 grace_s: float) -> None:
        options = {}
        if tls is not None:
            options = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
            if tls.client_ca is not None:
                options |= {"ssl_ca_certs": str(tls.client_ca),
                            "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                access_log=False, lifespan="off",
                                timeout_graceful_shutdown=max(int(grace_s), 1), **options)
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task | None = None
        self.host, self.port = host, port

    async def start(self) -> str:
        """Serve; returns HOST:PORT once bound (the port chosen when 0 was asked for)."""
        # Bound here, not by uvicorn: it exits the process when it cannot bind.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot bind the HTTP API to {self.host}:{self.port}: {e}") from None
        port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._server.serve(sockets=[sock]))
        deadline = loop.time() + START_TIMEOUT_S
        while not self._server.started:
            if self._task.done():
                raise OSError(f"the HTTP API did not start: {self._task.exception()!r}")
            if loop.time() > deadline:
                raise TimeoutError(f"the HTTP API did not start in {START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.02)
        return f"{self.host}:{port}"

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, STOP_TIMEOUT_S)
        except (TimeoutError, asyncio.CancelledError, SystemExit):
            self._task.cancel()
        self._task = None
