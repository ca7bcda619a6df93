"""Run a workload against a backend: every request leaves at its arrival time.

Arrivals are open-loop: a request is sent at `start + arrival_s` whether or not earlier ones
have finished, so a slow server builds a queue instead of slowing the load down. With
`max_concurrency`, a request that arrives while that many are in flight waits on the client for
a free slot; its TTFT and latency count from when it is actually sent, as in `vllm bench serve`,
so the cap shows up as lower throughput, not as latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from typing import Protocol

from tandem.loadgen.backend import Backend, RequestResult
from tandem.loadgen.workload import Request, Workload, random_prompt

WARMUP_PROMPT_TOKENS, WARMUP_OUTPUT_TOKENS = 64, 4


class ProgressHook(Protocol):
    """Told when each request is sent and when it ends (from the event loop's thread)."""

    def request_started(self, index: int, request: Request) -> None: ...

    def request_finished(self, index: int, request: Request, result: RequestResult) -> None: ...


@dataclass
class LoadRun:
    """The results of one run, in workload order, and when it ran (`time.perf_counter()`)."""

    results: list[RequestResult]
    started: float  # t = 0 of the arrivals
    ended: float  # the last request's end
    max_concurrency: int | None


async def run_load(
    workload: Workload,
    backend: Backend,
    *,
    max_concurrency: int | None = None,
    progress: ProgressHook | None = None,
) -> LoadRun:
    """Send every request of `workload` through `backend` at its arrival time."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    slots = (asyncio.Semaphore(max_concurrency) if max_concurrency is not None
             else contextlib.nullcontext())
    started = time.perf_counter()

    async def one(index: int, request: Request) -> RequestResult:
        await asyncio.sleep(max(0.0, started + request.arrival_s - time.perf_counter()))
        async with slots:
            if progress is not None:
                progress.request_started(index, request)
            result = await backend.send(request)
        if progress is not None:
            progress.request_finished(index, request, result)
        return result

    results = await asyncio.gather(*(one(i, r) for i, r in enumerate(workload.requests)))
    return LoadRun(list(results), started, time.perf_counter(), max_concurrency)


async def warm_up(backend: Backend, count: int, *, seed: int = -1) -> list[RequestResult]:
    """Send `count` short requests at once, unmeasured, so one-time costs (compilation, first
    allocations, connections) do not land on the first measured requests."""
    rng = random.Random(seed)
    requests = [Request(0.0, random_prompt(rng, WARMUP_PROMPT_TOKENS), WARMUP_OUTPUT_TOKENS)
                for _ in range(count)]
    return list(await asyncio.gather(*(backend.send(r) for r in requests)))
