"""Live migration between two decode workers, in one process: a running request is suspended on
one, its KV moves over a real transport (gRPC, NIXL) into blocks reserved on the other, and
the stream goes on there (fp32 greedy: identical to an undisturbed run)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from tandem.decode_worker.migration import MIGRATED
from tandem.decode_worker.worker import DecodeWorker
from tandem.engine.config import EngineConfig
from tandem.engine.errors import EngineError
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.sequence import SequenceStatus
from tandem.transfer.errors import TransferRejected
from tandem.worker_base import WorkerConfig

from .conftest import greedy, require_nixl, run_to_completion

PROMPT = list(range(300, 340))


class InProcessControl:
    """What a receiver's Ray handle does for `admit_kv_sender.remote(...)`, in one process."""

    def __init__(self, worker: DecodeWorker) -> None:
        self.worker, self.admit_kv_sender = worker, self

    def remote(self, transport: str, introduction: bytes):
        return self.worker.admit_kv_sender(transport, introduction)


def test_suspend_keeps_a_decoding_requests_kv_and_refuses_one_still_prefilling(make_engine):
    engine = make_engine(max_num_batched_tokens=16, max_num_seqs=4)
    engine.add_request("long", list(range(100, 180)), greedy(8))
    engine.step()  # the first 16 of 80 prompt tokens
    with pytest.raises(EngineError, match="not a decoding request"):
        engine.suspend("long")
    engine.add_request("r", PROMPT, greedy(8))
    while engine.seqs["r"].num_output_tokens < 3:
        engine.step()
    suspended = engine.suspend("r")
    assert suspended.num_kv_tokens == len(suspended.token_ids) - 1
    assert suspended.block_ids == engine.block_table("r")
    assert engine.seqs["r"].status == SequenceStatus.PREFILLED
    assert "r" not in engine.scheduled_request_ids()
    engine.release("r")


async def _workers(transport: str, loaded) -> tuple[DecodeWorker, DecodeWorker]:
    config = WorkerConfig(engine=EngineConfig(dtype="float32", kv_cache_gb=0.05),
                          kv_transport=transport, host="127.0.0.1", handoff_timeout_s=10)
    a, b = (DecodeWorker(config, "m", loaded=loaded), DecodeWorker(config, "m", loaded=loaded))
    await asyncio.gather(a.start(), b.start())
    return a, b


async def _tokens(worker: DecodeWorker, request_id: str, until) -> tuple[list[int], str | None]:
    got: list[int] = []
    while True:
        for delta in await worker.poll(request_id, 10):
            got.extend(delta.token_ids)
            if delta.finish_reason is not None or until(got):
                return got, delta.finish_reason


async def _move(transport: str, n: int, precopy: bool, loaded) -> tuple[list[int], dict]:
    a, b = await _workers(transport, loaded)
    try:
        params = greedy(n)
        await a.generate("r", PROMPT, params)
        got, _ = await _tokens(a, "r", lambda got: len(got) >= 10)
        receiver = replace(b.kv_receivers[0], control=InProcessControl(b))
        first_block = 0
        if precopy:  # stage 1, while it keeps decoding on a
            known = PROMPT + got
            first_block = (len(known) - 2) // 16
            blocks = await b.reserve("r2", known[:first_block * 16], params.after(len(got) - 1),
                                     num_sent=1)
            await a.precopy("r", receiver, blocks, "r2", first_block)
            more, _ = await _tokens(a, "r", lambda more: len(more) >= 5)
            got += more
        suspended = await a.suspend("r")
        rest, reason = await _tokens(a, "r", lambda got: False)  # up to the MIGRATED delta
        assert reason == MIGRATED
        got += rest
        assert suspended.token_ids == PROMPT + got  # nothing generated after the suspend
        k = len(got)
        if precopy:
            blocks = await b.extend("r2", suspended.token_ids[first_block * 16:-1],
                                    params.after(k - 1))
        else:
            blocks = await b.reserve("r2", suspended.token_ids[:-1], params.after(k - 1),
                                     num_sent=1)
        result = await a.send_request("r", receiver, blocks, "r2", first_block)
        assert result.transport == transport and result.num_tokens == len(PROMPT) + k - 1
        rest, reason = await _tokens(b, "r2", lambda got: False)
        assert reason == "length"
        stats = {"a": (await a.stats()).engine, "b": (await b.stats()).engine,
                 "handoffs": dict(a.handoffs)}
        return got + rest, stats
    finally:
        await asyncio.gather(a.shutdown(), b.shutdown())


@pytest.mark.parametrize("precopy", [False, True], ids=["one-piece", "pre-copied"])
@pytest.mark.parametrize("transport", ["grpc", "nixl"])
def test_a_request_moves_with_its_kv_and_its_stream_continues_identically(
        transport, precopy, make_engine, loaded_fp32):
    if transport == "nixl":
        require_nixl()
    n = 40
    want = run_to_completion(make_engine(), [PROMPT], greedy(n))[0]
    got, stats = asyncio.run(_move(transport, n, precopy, loaded_fp32))
    assert got == want  # no token lost, repeated or changed
    for engine in (stats["a"], stats["b"]):  # both hold nothing at the end
        assert engine.num_free_blocks == engine.num_blocks
    want_handoffs = {f"{transport}/migration": 1}
    if precopy:
        want_handoffs[f"{transport}/precopy"] = 1
    assert stats["handoffs"] == want_handoffs


async def _refused(loaded) -> tuple[type, int, int]:
    a, b = await _workers("grpc", loaded)
    try:
        await a.generate("r", PROMPT, greedy(30))
        await _tokens(a, "r", lambda got: len(got) >= 4)
        await a.suspend("r")
        # Blocks for the wrong number of tokens: the receiver refuses the KV.
        blocks = await b.reserve("r2", PROMPT[:20], SamplingParams(max_tokens=8), num_sent=1)
        error: type = type(None)
        try:
            await a.send_request("r", b.kv_receivers[0], blocks, "r2")
        except Exception as e:
            error = type(e)
        await b.abort("r2", "grpc")
        free = (await a.stats()).engine
        return error, free.num_free_blocks, free.num_blocks
    finally:
        await asyncio.gather(a.shutdown(), b.shutdown())


def test_a_refused_migration_raises_and_frees_the_source_blocks(loaded_fp32):
    error, free, total = asyncio.run(_refused(loaded_fp32))
    assert issubclass(error, TransferRejected)
    assert free == total
