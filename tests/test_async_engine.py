"""`AsyncEngine`: the engine on its own thread, outputs delivered to asyncio streams in order."""

from __future__ import annotations

import asyncio

from tandem.engine.async_engine import AsyncEngine

from .conftest import greedy


async def collect(stream) -> list:
    items = []
    while not items or not (isinstance(items[-1], BaseException) or items[-1].finished):
        items.append(await asyncio.wait_for(stream.get(), 60))
    return items


def test_streams_get_every_token_in_order(make_engine, loaded_fp32):
    engine = make_engine()
    prompts = [loaded_fp32.tokenizer.encode(t) for t in ("Hello there", "Count: 1, 2, 3,")]

    async def main():
        runner = AsyncEngine(engine)
        streams = [runner.open_stream(f"r{i}") for i in range(len(prompts))]
        for i, p in enumerate(prompts):
            await runner.call(lambda e, i=i, p=p: e.add_request(f"r{i}", p, greedy(6)))
        outs = [await collect(s) for s in streams]
        await runner.close()
        return outs

    outs = asyncio.run(main())
    for items in outs:
        assert [len(o.token_ids) for o in items] == list(range(1, 7))
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_call_errors_go_back_to_the_caller(make_engine):
    async def main():
        runner = AsyncEngine(make_engine())
        try:
            await runner.call(lambda e: e.add_request("x", [], greedy(2)))
        except ValueError as e:
            return str(e)
        finally:
            await runner.close()

    assert "prompt: is empty" in asyncio.run(main())


def test_failed_step_fails_its_requests_and_frees_blocks(make_engine):
    engine = make_engine()

    def broken_step() -> None:
        raise RuntimeError("boom")

    async def main():
        runner = AsyncEngine(engine, before_step=broken_step)
        stream = runner.open_stream("a")
        await runner.call(lambda e: e.add_request("a", [1, 2, 3], greedy(4)))
        items = await collect(stream)
        await runner.close()
        return items

    (error,) = asyncio.run(main())
    assert isinstance(error, RuntimeError) and "boom" in str(error)
    assert engine.stats().num_free_blocks == engine.stats().num_blocks
    assert not engine.has_unfinished_requests()


def test_failed_step_leaves_reserved_requests_to_their_transfer(make_engine):
    engine = make_engine()

    def broken_step() -> None:
        raise RuntimeError("boom")

    async def main():
        runner = AsyncEngine(engine, before_step=broken_step)
        blocks = await runner.call(lambda e: e.reserve("incoming", list(range(40)), greedy(4)))
        stream = runner.open_stream("a")
        await runner.call(lambda e: e.add_request("a", [1, 2, 3], greedy(4)))
        items = await collect(stream)
        await runner.close()
        return blocks, items

    blocks, (error,) = asyncio.run(main())
    assert isinstance(error, RuntimeError)
    # KV may still be landing in the reserved blocks: only their owner may free them.
    assert engine.block_table("incoming") == blocks
    assert engine.stats().num_reserved == 1
