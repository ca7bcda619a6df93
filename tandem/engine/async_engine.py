"""`AsyncEngine`: an `LLMEngine` on its own thread, driven from an asyncio event loop.

Only the engine thread touches the engine. Callers hand it functions with `call` (run between
steps) and read each request's outputs from the queue `open_stream` returned; outputs and
errors cross back to the event loop with `call_soon_threadsafe`. This is what lets a worker keep
serving RPCs and receiving KV while the model computes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from tandem.engine.engine import LLMEngine
from tandem.engine.errors import RequestFailedError
from tandem.engine.outputs import RequestOutput

logger = logging.getLogger(__name__)

T = TypeVar("T")
StreamItem = Any  # a RequestOutput (or what `on_output` made of it) or an exception
OutputHook = Callable[[LLMEngine, RequestOutput], Any]
_STOP = object()
IDLE_WAIT_S = 0.005


class AsyncEngine:
    """`before_step` runs before every step (raising fails it); `on_output(engine, output)` runs
    on the engine thread right after the step that produced `output`, and what it returns is
    published instead (e.g. a prefill worker exports the KV before the next step starts)."""

    def __init__(self, engine: LLMEngine, before_step: Callable[[], None] | None = None,
                 on_output: OutputHook | None = None) -> None:
        self.engine = engine
        self.before_step, self.on_output = before_step, on_output
        self._loop = asyncio.get_running_loop()
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[StreamItem]] = {}
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def call(self, fn: Callable[[LLMEngine], T], publish_to: str | None = None) -> T:
        """Run `fn(engine)` on the engine thread between steps and return its result; with
        `publish_to`, a non-None result also goes on that request's stream, in step order."""
        if self._dead is not None:
            raise RuntimeError(f"the engine thread died: {self._dead!r}")
        future = self._loop.create_future()
        self._calls.put((fn, future, publish_to))
        return await future

    def open_stream(self, request_id: str) -> asyncio.Queue[StreamItem]:
        """Where the outputs of `request_id` will arrive; open it before adding the request."""
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stream = self._streams[request_id] = asyncio.Queue()
        return stream

    def stream_of(self, request_id: str) -> asyncio.Queue[StreamItem]:
        """The stream already opened for `request_id`."""
        stream = self._streams.get(request_id)
        if stream is None:
            raise KeyError(f"no open stream for request {request_id!r}")
        return stream

    def has_stream(self, request_id: str) -> bool:
        """Whether `request_id`'s stream is still open (an abort closes it)."""
        return request_id in self._streams

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def publish(self, output: StreamItem, request_id: str) -> None:
        """Put an item on a request's stream (from the event loop)."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(output)

    async def close(self) -> None:
        self._calls.put(_STOP)
        await asyncio.to_thread(self._thread.join, 10.0)

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop_forever()
        except BaseException as e:  # the thread must not die silently: fail every waiter
            logger.exception("engine thread died")
            self._dead = e
            for request_id in list(self._streams):
                self._loop.call_soon_threadsafe(self.publish, e, request_id)
            while True:
                try:
                    item = self._calls.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    self._loop.call_soon_threadsafe(_settle, item[1], None, e)

    def _loop_forever(self) -> None:
        idle = False  # the last step produced nothing: wait a little for calls before retrying
        while True:
            busy = self.engine.has_unfinished_requests()
            while True:
                try:
                    item = self._calls.get(block=not busy or idle,
                                           timeout=IDLE_WAIT_S if busy else None)
                except queue.Empty:
                    break
                if item is _STOP:
                    return
                self._run_call(*item)
                busy = self.engine.has_unfinished_requests()
                idle = False
            if busy:
                idle = not self._step()

    def _run_call(self, fn: Callable[[LLMEngine], Any], future: asyncio.Future,
                  publish_to: str | None) -> None:
        try:
            result = fn(self.engine)
        except Exception as e:  # handed back to the caller, who decides
            self._loop.call_soon_threadsafe(_settle, future, None, e)
            return
        if publish_to is not None and result is not None:
            self._loop.call_soon_threadsafe(self.publish, result, publish_to)
        self._loop.call_soon_threadsafe(_settle, future, result, None)

    def _step(self) -> bool:
        """One engine step; False when it produced no output."""
        try:
            if self.before_step is not None:
                self.before_step()
            outputs = self.engine.step()
        except Exception as e:
            # Only requests in the batch fail: reserved ones (KV arriving) and prefilled ones
            # (KV leaving) belong to their transfers, which free their blocks when safe.
            failed = self.engine.scheduled_request_ids()
            logger.exception("engine step failed; failing its %d requests", len(failed))
            for request_id in failed:
                self.engine.abort(request_id)
                self._loop.call_soon_threadsafe(self.publish, e, request_id)
            return True
        for output in outputs:
            item: StreamItem = output
            if output.error is not None and output.finish_reason == "error":  # it alone failed
                item = RequestFailedError(f"request {output.request_id}: {output.error}")
            elif self.on_output is not None:
                try:
                    item = self.on_output(self.engine, output)
                except Exception as e:
                    logger.exception("request %s: on_output failed", output.request_id)
                    item = e
            self._loop.call_soon_threadsafe(self.publish, item, output.request_id)
        return bool(outputs)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
