"""`AdmissionQueue`: requests waiting for KV blocks on a decode worker, served in order.

Only the request at the head asks the decode workers for blocks. When they are all full it waits
for capacity to change: a request of this router ended (its blocks were freed) or a worker was
added, with a slow re-check as a fallback for blocks freed behind the router's back (leases,
preemption). So a queue of any length costs the workers one round of calls per event, not one
per waiting request every few milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

from tandem.cluster.errors import Overloaded

RECHECK_S = 1.0  # the head's fallback re-check while nothing signals freed capacity


class AdmissionQueue:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._generation = 0  # counts capacity changes
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[asyncio.Future[None]]:
        """Wait for this request's turn at the head (RESOURCE_EXHAUSTED when the queue is
        full); the turn ends when the block exits. The future it yields may be resolved early
        (`release`) to let an aborted request leave without waiting."""
        if len(self._waiters) >= self.limit:
            raise Overloaded(f"{len(self._waiters)} requests are waiting for a worker "
                             f"(max_queued_requests={self.limit}); retry later")
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        if self._waiters[0] is turn:
            turn.set_result(None)
        try:
            yield turn
        finally:
            self._waiters.remove(turn)
            if self._waiters and not self._waiters[0].done():
                self._waiters[0].set_result(None)

    @staticmethod
    def release(turn: asyncio.Future[None] | None) -> None:
        if turn is not None and not turn.done():
            turn.set_result(None)

    @property
    def generation(self) -> int:
        return self._generation

    def capacity_changed(self) -> None:
        """Blocks were freed or a worker was added: the head tries again."""
        self._generation += 1
        self._changed.set()

    async def wait_for_capacity(self, seen: int, timeout: float = RECHECK_S) -> None:
        """Return once capacity changed after generation `seen`, or after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._generation == seen:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
