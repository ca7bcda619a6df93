"""`AdmissionQueue`: FIFO turns, a bounded length, early release of aborted requests, and the
head's wait for capacity woken by events (no cluster: pure asyncio)."""

from __future__ import annotations

import asyncio

import pytest

from tandem.cluster.admission import AdmissionQueue
from tandem.cluster.errors import Overloaded


def test_turns_are_taken_in_arrival_order():
    async def run() -> list[int]:
        queue, order = AdmissionQueue(limit=8), []

        async def request(i: int) -> None:
            async with queue.turn() as turn:
                await turn
                order.append(i)
                await asyncio.sleep(0.01)  # holds the head while the others wait

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(request(i)))
            await asyncio.sleep(0)  # arrive in this order
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(run()) == [0, 1, 2, 3, 4]


def test_a_full_queue_refuses_with_overloaded():
    async def run() -> None:
        queue = AdmissionQueue(limit=2)
        held = asyncio.Event()

        async def waiter() -> None:
            async with queue.turn() as turn:
                await turn
                await held.wait()

        tasks = [asyncio.create_task(waiter()) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="max_queued_requests=2"):
            async with queue.turn():
                pass
        held.set()
        await asyncio.gather(*tasks)
        assert len(queue) == 0

    asyncio.run(run())


def test_a_released_waiter_leaves_without_waiting_for_the_head():
    async def run() -> None:
        queue = AdmissionQueue(limit=4)
        head_done = asyncio.Event()
        left = asyncio.Event()

        async def head() -> None:
            async with queue.turn() as turn:
                await turn
                await head_done.wait()

        async def second() -> None:
            async with queue.turn() as turn:
                waiting.append(turn)
                await turn
                left.set()

        waiting: list[asyncio.Future] = []
        h = asyncio.create_task(head())
        await asyncio.sleep(0)
        s = asyncio.create_task(second())
        await asyncio.sleep(0.01)
        assert not left.is_set()
        AdmissionQueue.release(waiting[0])  # aborted while it waited
        await asyncio.wait_for(left.wait(), 1)
        head_done.set()
        await asyncio.gather(h, s)

    asyncio.run(run())


def test_the_head_wakes_when_capacity_changes_not_by_polling():
    async def run() -> None:
        queue = AdmissionQueue(limit=4)
        # The fallback re-check is an hour away: only the event can wake this waiter.
        waiter = asyncio.create_task(queue.wait_for_capacity(queue.generation, timeout=3600))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        queue.capacity_changed()
        await asyncio.wait_for(waiter, 30)
        # A change before the wait began is not missed either.
        seen = queue.generation
        queue.capacity_changed()
        await asyncio.wait_for(queue.wait_for_capacity(seen, timeout=3600), 30)

    asyncio.run(run())
