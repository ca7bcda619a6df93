"""`WriteQueue`: a bounded queue of work that one background thread runs in order.

Callers never wait: when the queue is full the item is dropped and counted, because a cache
write is worth less than the request that would otherwise stall behind it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_STOP = object()


class WriteQueue:
    def __init__(self, handle: Callable[[Any], None], max_pending: int, name: str) -> None:
        self.handle, self.max_pending = handle, max_pending
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> bool:
        """Queue `item`; False (and counted) if the queue is full."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    @property
    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def flush(self, timeout: float) -> None:
        """Wait until every queued item has been handled."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._queue.unfinished_tasks} writes still pending after "
                                   f"{timeout} s")
            time.sleep(0.005)

    def close(self, timeout: float = 10.0) -> None:
        """Handle what is queued (for at most `timeout` seconds), then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self.handle(item)
            except Exception:
                logger.exception("%s: a background write failed", self._thread.name)
            finally:
                self._queue.task_done()
