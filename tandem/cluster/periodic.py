"""One way to run a round of work every few seconds on the event loop (the worker monitor,
the rebalancer, the node follower, the health checks): a failed round is logged and the next
one runs, since a watcher that dies quietly leaves figures frozen and pools unwatched."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)


class Periodic:
    def __init__(self, what: str, interval_s: float, round: Callable[[], Awaitable[object]],
                 first_at_once: bool = False) -> None:
        self.what, self.interval_s, self.round = what, interval_s, round
        self.first_at_once = first_at_once
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        if not self.first_at_once:
            await asyncio.sleep(self.interval_s)
        while True:
            try:
                await self.round()
            except Exception:  # the loop must outlive one bad round
                logger.exception("%s failed", self.what)
            await asyncio.sleep(self.interval_s)
