"""Only exact KV enters a prefix cache. A decode worker's request that arrived with blended KV
(approximate past its prefix) is preempted: its recomputation must find no approximate block in
the prefix cache, so the recomputed KV and the tokens after it equal full prefill's (fp32)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import torch

from tandem.engine.blend_planner import BlendPlanner
from tandem.engine.blend_select import CACHEBLEND
from tandem.engine.chunk_cache import MemoryChunkCache
from tandem.engine.segments import SegmentedPrompt
from tandem.engine.sequence import SequenceStatus
from tandem.transfer.base import Handoff

from .conftest import greedy, run_to_completion

TEXT = (Path(__file__).parents[1] / "bench" / "data" / "harbour.txt").read_text()
PARAGRAPHS = [p for p in TEXT.split("\n") if len(p) > 300]
SEGMENTS = ["You keep the harbour records.", PARAGRAPHS[0], PARAGRAPHS[1],
            "Question: Who kept the ledger?\nAnswer:"]
DECODED_BEFORE_PREEMPTION = 3


def _kv_of(engine, request_id: str, num_tokens: int) -> torch.Tensor:
    """The KV in a request's blocks, [layers, 2, num_tokens, heads, dim]."""
    spec = engine.kv_spec
    data = engine.cache.gather(range(spec.num_layers), engine.block_table(request_id)).cpu()
    return data.reshape(spec.num_layers, 2, -1, spec.num_kv_heads, spec.head_dim)[:, :, :num_tokens]


def _full_prefill_kv(make_engine, token_ids: list[int]) -> torch.Tensor:
    engine = make_engine(enable_prefix_caching=False)
    engine.add_request("ref", token_ids, greedy(1), prefill_only=True)
    while engine.seqs["ref"].status != SequenceStatus.PREFILLED:
        engine.step()
    kv = engine.export_kv("ref")
    spec = kv.spec
    return kv.data.reshape(spec.num_layers, 2, -1, spec.num_kv_heads,
                           spec.head_dim)[:, :, :len(token_ids)]


def _preempt_and_recompute(engine, request_id: str) -> int:
    """Preempt a decoding request and step until its KV is recomputed; returns the tokens its
    recomputation took from the prefix cache."""
    seq = engine.seqs[request_id]
    engine.scheduler._preempt(seq)  # what a full pool does to the newest runner
    assert seq.status == SequenceStatus.WAITING and seq.num_computed_tokens == 0
    cached = None
    while seq.num_computed_tokens < seq.num_tokens - 1:
        engine.step()
        cached = seq.num_cached_tokens if cached is None else cached
    return cached


def test_a_preempted_request_that_arrived_with_blended_kv_is_recomputed_exactly(make_engine):
    decode = make_engine(enable_prefix_caching=True, max_num_batched_tokens=2048)
    prompt = SegmentedPrompt.tokenize(decode.tokenizer, SEGMENTS, 0.0)  # full reuse: far off
    blended = BlendPlanner(decode.loaded.model, decode.kv_spec,  # CacheBlend: no cold prefill
                           MemoryChunkCache(1 << 28)).plan(prompt, options=CACHEBLEND)
    ids = prompt.token_ids
    chunks_end = blended.kv.num_tokens
    assert blended.exact_tokens == len(prompt.prefix) < chunks_end
    # The prefill side computes the question on top of the blended KV: so does this engine's
    # import, from KV covering the prefix and chunks plus the question computed here.
    prefill = make_engine(enable_prefix_caching=False)
    prefill.add_request("p", ids, greedy(1), prefill_only=True, blended=blended)
    while prefill.seqs["p"].status != SequenceStatus.PREFILLED:
        first = prefill.step()
    kv = prefill.export_kv("p")
    first_token = first[0].token_ids
    decode.import_request("r", ids, first_token, greedy(12), kv, blended.exact_tokens)
    for _ in range(DECODED_BEFORE_PREEMPTION):
        decode.step()
    approximate = _kv_of(decode, "r", chunks_end)
    exact_before = _full_prefill_kv(make_engine, ids)[:, :, :chunks_end]
    assert not torch.allclose(approximate, exact_before, atol=1e-3)  # the blend is approximate

    cached = _preempt_and_recompute(decode, "r")
    block = decode.kv_spec.block_size
    assert cached <= blended.exact_tokens // block * block  # only the exact prefix's blocks
    seq = decode.seqs["r"]
    recomputed = seq.token_ids[:seq.num_computed_tokens]
    torch.testing.assert_close(_kv_of(decode, "r", len(recomputed)),
                               _full_prefill_kv(make_engine, recomputed), atol=1e-4, rtol=1e-4)
    # From here on it decodes on exact KV: the undisturbed run of the same tokens continues
    # with the same tokens.
    out = None
    while out is None or not out.finished:
        out = next((o for o in decode.step() if o.request_id == "r"), out)
    generated = seq.token_ids[len(ids):]
    before = len(recomputed) + 1 - len(ids)
    want = run_to_completion(make_engine(), [seq.token_ids[:len(ids) + before]],
                             greedy(len(generated) - before))[0]
    assert generated[before:] == want


def test_exact_kv_is_still_shared_and_bad_exact_counts_are_refused(make_engine):
    engine = make_engine(enable_prefix_caching=True)
    ids = [(11 * i) % 9000 + 200 for i in range(70)]
    engine.add_request("p", ids, greedy(1), prefill_only=True)
    while engine.seqs["p"].status != SequenceStatus.PREFILLED:
        first = engine.step()
    kv = engine.export_kv("p")
    engine.release("p")
    try:
        engine.import_request("bad", ids, first[0].token_ids, greedy(4), kv, len(ids) + 1)
    except ValueError as e:
        assert "exact_tokens" in str(e)
    else:
        raise AssertionError("an exact_tokens past the prompt was accepted")
    assert "bad" not in engine.seqs
    engine.import_request("r", ids, first[0].token_ids, greedy(4), kv)  # all exact
    engine.step()
    n, block = engine.seqs["r"].num_tokens, engine.kv_spec.block_size
    assert _preempt_and_recompute(engine, "r") == (n - 1) // block * block


def test_a_handoff_limits_its_exact_tokens_but_never_widens_them():
    handoff = Handoff("r", [1], 32)
    assert handoff.limited_to(None) is handoff
    assert handoff.limited_to(0).exact_tokens == 0
    assert handoff.limited_to(64).exact_tokens == 32
    assert Handoff("r", [1]).limited_to(16).exact_tokens == 16


async def _blended_over_grpc(loaded) -> list[tuple[int | None, int]]:
    from tandem.decode_worker.worker import DecodeWorker
    from tandem.engine.config import EngineConfig
    from tandem.prefill_worker.worker import PrefillWorker
    from tandem.worker_base import WorkerConfig

    from .test_migration import InProcessControl

    config = WorkerConfig(
        engine=EngineConfig(dtype="float32", kv_cache_gb=0.05, enable_prefix_caching=True),
        kv_transport="grpc", host="127.0.0.1", handoff_timeout_s=30,
        kv_store={"cpu_gb": 0.1, "ssd_gb": 0})
    prefill = PrefillWorker(config, "m", loaded=loaded)
    decode = DecodeWorker(config, "m", loaded=loaded)
    await asyncio.gather(prefill.start(), decode.start())
    try:
        segments = SegmentedPrompt.tokenize(decode.engine.engine.tokenizer, SEGMENTS, 0.15)
        params = greedy(200)  # still decoding when it is looked at
        receiver = replace(decode.kv_receivers[0], control=InProcessControl(decode))
        seen = []
        for request_id in ("cold", "blended"):  # no chunk cached, then one from a variant
            blocks = await decode.reserve(request_id, segments.token_ids, params)
            await prefill.prefill(request_id, segments.token_ids, params, receiver, blocks,
                                  segments)
            seq = await decode.engine.call(lambda e, r=request_id: e.seqs.get(r))
            seen.append((None if seq is None else seq.cacheable_tokens, seq is not None))
            await asyncio.to_thread(prefill.store.flush, 30)  # the variants are written
        return [(c, len(segments.prefix)) for c, _ in seen]
    finally:
        await asyncio.gather(prefill.shutdown(), decode.shutdown())


def test_blended_kv_sent_over_grpc_arrives_marked_approximate_past_its_prefix(loaded_fp32):
    (cold, _), (blended, prefix) = asyncio.run(_blended_over_grpc(loaded_fp32))
    assert cold is None  # prefilled in full: all of it exact, all of it shareable
    assert blended == prefix
