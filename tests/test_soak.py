"""A 60-second soak: 64 concurrent streaming clients (closed loop, through `tandem bench`'s load
code) against the session's real cluster. No request may fail, and afterwards no KV block is
held and no transfer session is open; each worker's RSS is reported, not asserted."""

from __future__ import annotations

import asyncio

import pytest

from tandem.loadgen import GrpcBackend, LengthRange, summarize
from tandem.loadgen.soak import closed_loop

pytestmark = pytest.mark.slow

CLIENTS, DURATION_S = 64, 60.0


def test_sixty_second_soak_has_no_errors_and_leaves_nothing_held(server):
    rss_before = [s.rss_bytes for s in server.stats()]

    async def soak():
        async with GrpcBackend(server.address, timeout=300) as backend:
            await backend.served_model()
            return await closed_loop(backend, CLIENTS, DURATION_S, LengthRange(16, 64),
                                     LengthRange(4, 16))

    results = asyncio.run(soak())
    summary = summarize(results)
    assert summary.failed == 0, summary.error_codes
    assert summary.completed == len(results) > CLIENTS
    stats = server.wait_idle(timeout=60)  # every block free, no stream or session open
    assert all(s.num_open_requests == 0 for s in stats)
    rss_after = [s.rss_bytes for s in stats]
    print(f"soak: {summary.completed} requests in {DURATION_S:.0f} s, "
          f"{summary.output_throughput:.1f} tok/s, TTFT p99 {summary.ttft.p99:.2f} s; worker "
          f"RSS {[f'{b / 2**20:.0f}' for b in rss_before]} -> "
          f"{[f'{a / 2**20:.0f}' for a in rss_after]} MiB")
