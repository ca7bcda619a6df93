"""SIGTERM on a worker process means drain: the worker asks to be drained (its stats say so, and
the pool manager's next health check drains it: no new requests, running ones move with their
KV), and is stopped once it holds nothing. A second SIGTERM exits at once.

A Ray actor's code never runs on its process's main thread, so it cannot install a signal
handler (`signal.signal` is main-thread only). Ray's worker main loop installs one that exits
through `ray._private.worker.raise_sys_exit_with_custom_error_message`; this module wraps that
function, looked up at call time, and lets every other exit through unchanged. A Ray release
that renames it makes `drain_on_sigterm` return False (logged), and SIGTERM exits as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

SIGTERM_MESSAGE = "The process receives a SIGTERM."


def drain_on_sigterm(request_drain: Callable[[], None]) -> bool:
    """Make the first SIGTERM of this Ray worker process call `request_drain` (from the
    signal handler: it must only set state) instead of exiting; whether that took."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return False
    exit_with = getattr(ray_worker, "raise_sys_exit_with_custom_error_message", None)
    if exit_with is None:
        logger.warning("this Ray release has no SIGTERM exit hook to wrap: SIGTERM stops the "
                       "worker without draining it")
        return False
    if getattr(exit_with, "drains", False):  # already wrapped in this process
        return True
    terms = 0

    def exit_or_drain(message: str, exit_code: int = 0) -> None:
        nonlocal terms
        if message == SIGTERM_MESSAGE:
            terms += 1
            if terms == 1:
                request_drain()
                return
        exit_with(message, exit_code)

    exit_or_drain.drains = True  # type: ignore[attr-defined]
    ray_worker.raise_sys_exit_with_custom_error_message = exit_or_drain
    return True
