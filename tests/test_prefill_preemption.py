"""A layer-wise prefill preempted midway: the blocks its in-flight WRITEs read stay pinned
(not reused) until that transfer ends, and the recomputed KV is sent again in a new transfer,
so the request succeeds (fp32 greedy: identical to an undisturbed run) over real transports."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from tandem.decode_worker.worker import DecodeWorker
from tandem.engine.config import EngineConfig
from tandem.engine.sequence import SequenceStatus
from tandem.prefill_worker.worker import PrefillWorker
from tandem.worker_base import WorkerConfig

from .conftest import greedy, require_nixl, run_to_completion
from .test_migration import InProcessControl

PROMPT = [(7 * i) % 20000 + 300 for i in range(640)]  # 10 chunks of 64 tokens


def test_a_preemption_pins_the_blocks_until_the_owner_unpins_them(make_engine):
    engine = make_engine(max_num_batched_tokens=64, max_num_seqs=4)
    pinned: list[list[int]] = []
    engine.add_request("r", PROMPT[:200], greedy(1), prefill_only=True,
                       on_preempt=pinned.append)
    engine.step()
    free = engine.blocks.num_free_blocks
    engine.scheduler._preempt(engine.seqs["r"])  # what a full pool does to the last runner
    assert len(pinned) == 1 and len(pinned[0]) == 4  # 64 tokens of blocks, held
    assert engine.blocks.num_free_blocks == free
    engine.unpin_blocks(pinned[0])
    assert engine.blocks.num_free_blocks == free + 4


async def _preempted_handoff(transport: str, loaded) -> tuple[list[int], dict, int, int]:
    config = WorkerConfig(
        engine=EngineConfig(dtype="float32", kv_cache_gb=0.05, max_num_batched_tokens=64,
                            max_num_seqs=4),
        kv_transport=transport, kv_streaming="layerwise", host="127.0.0.1",
        handoff_timeout_s=10, kv_store={"enabled": False})
    prefill = PrefillWorker(config, "m", loaded=loaded)
    decode = DecodeWorker(config, "m", loaded=loaded)
    await asyncio.gather(prefill.start(), decode.start())
    try:
        params = greedy(8)
        blocks = await decode.reserve("r", PROMPT, params)
        receiver = replace(decode.kv_receivers[0], control=InProcessControl(decode))
        task = asyncio.ensure_future(prefill.prefill("r", PROMPT, params, receiver, blocks))

        def preempt(e) -> bool | None:
            seq = e.seqs.get("r")
            if seq is None or seq.status != SequenceStatus.RUNNING:
                return None if seq is None or seq.num_computed_tokens == 0 else False
            if not 128 <= seq.num_computed_tokens < len(PROMPT):
                return None
            e.scheduler._preempt(seq)  # mid-stream: some layers' blocks are on their way
            return True

        while (done := await prefill.engine.call(preempt)) is None:
            await asyncio.sleep(0.002)
        assert done, "the prefill ended before it could be preempted"
        result = await task
        tokens: list[int] = []  # the first delta holds the prefill worker's token too
        while True:
            deltas = await decode.poll("r", 10)
            tokens += [t for d in deltas for t in d.token_ids]
            if any(d.finish_reason for d in deltas):
                break
        await asyncio.sleep(0.1)  # the prefill worker frees its blocks right after
        stats = (await prefill.stats()).engine
        assert tokens[:1] == result.output_token_ids
        return tokens, dict(prefill.handoffs), stats.num_free_blocks, stats.num_blocks
    finally:
        await asyncio.gather(prefill.shutdown(), decode.shutdown())


@pytest.mark.parametrize("transport", ["grpc", "nixl"])
def test_a_preempted_layerwise_prefill_streams_its_kv_again_and_succeeds(transport,
                                                                          make_engine,
                                                                          loaded_fp32):
    if transport == "nixl":
        require_nixl()
    want = run_to_completion(make_engine(), [PROMPT], greedy(8))[0]
    tokens, handoffs, free, total = asyncio.run(_preempted_handoff(transport, loaded_fp32))
    assert tokens == want
    assert handoffs == {f"{transport}/restreamed": 1, f"{transport}/layerwise": 1}
    assert free == total  # the pinned blocks were given back
