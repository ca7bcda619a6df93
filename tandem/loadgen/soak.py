"""`closed_loop`: N clients that each send one request after another until a deadline.

A soak test's load: the concurrency stays at N the whole time (an open-loop replay would let
it drift with the server's speed). Each client draws its prompts from its own seeded RNG.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from tandem.loadgen.backend import Backend, RequestResult
from tandem.loadgen.workload import LengthRange, Request

TOKEN_LOW, TOKEN_HIGH = 1000, 40000  # ordinary tokens: no special ones in the prompts


async def closed_loop(backend: Backend, clients: int, duration_s: float,
                      prompt_len: LengthRange, output_len: LengthRange, seed: int = 0,
                      on_result: Callable[[RequestResult], None] | None = None) \
        -> list[RequestResult]:
    """Run `clients` loops for `duration_s` seconds; every result, in completion order. A
    request in flight at the deadline is let finish (it is counted)."""
    deadline = time.monotonic() + duration_s
    results: list[RequestResult] = []

    async def client(index: int) -> None:
        rng = random.Random(seed * 1_000_003 + index)
        while time.monotonic() < deadline:
            prompt = [rng.randrange(TOKEN_LOW, TOKEN_HIGH)
                      for _ in range(rng.randint(prompt_len.low, prompt_len.high))]
            request = Request(0.0, prompt, rng.randint(output_len.low, output_len.high))
            result = await backend.send(request)
            results.append(result)
            if on_result is not None:
                on_result(result)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return results
