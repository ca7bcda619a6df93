"""Cache-Craft: chunk variants computed in real contexts, per-chunk recompute budgets from the
measured dependence, and chunk caches kept by value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tandem.engine.blend_planner import BlendPlanner
from tandem.engine.blend_select import CACHEBLEND, DEFAULT_POLICY, dependence_shares
from tandem.engine.chunk_cache import MemoryChunkCache, chunk_value
from tandem.engine.chunk_variants import Variant, choose, chunk_hash, context_of, overlap
from tandem.engine.kv_cache import KVBlocks, KVSpec
from tandem.engine.segments import SegmentedPrompt
from tandem.kv_store.chunk_cache import StoreChunkCache
from tandem.kv_store.codec import get_codec
from tandem.kv_store.kv_object import decode_object, encode_object
from tandem.kv_store.store import TieredStore
from tandem.kv_store.tiers.memory import MemoryTier

TEXT = (Path(__file__).parents[1] / "bench" / "data" / "harbour.txt").read_text()
A, B, C, X, Y = (chunk_hash([i]) for i in range(5))


@pytest.fixture(scope="module")
def engine(loaded_fp32):
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import LLMEngine

    return LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.2, num_threads=2,
                                  enable_prefix_caching=False), loaded=loaded_fp32)


def prompt_of(engine, order: list[int], ratio: float = 0.3) -> SegmentedPrompt:
    ids = engine.tokenizer.encode(TEXT)
    pieces = [ids[100:160], ids[400:470], ids[800:850], ids[1200:1260]]
    question = engine.tokenizer.encode("\n\nQuestion: What did the keeper keep?\nAnswer:",
                                       add_special_tokens=False)
    return SegmentedPrompt(ids[:24], [pieces[i] for i in order], question, ratio)


def full_kv(engine, prompt: SegmentedPrompt) -> torch.Tensor:
    from tandem.engine.blend import compute_kv

    n = len(prompt.prefix) + prompt.num_chunk_tokens
    return compute_kv(engine.loaded.model, engine.kv_spec, prompt.token_ids[:n])


def flat(result, spec, prompt: SegmentedPrompt) -> torch.Tensor:
    """The blended KV of the prefix and chunks (a question-aware blend covers more)."""
    n = len(prompt.prefix) + prompt.num_chunk_tokens
    data = result.kv.data.reshape(spec.num_layers, 2, -1, spec.num_kv_heads, spec.head_dim)
    return data[:, :, :n]


def test_the_planner_picks_the_most_overlapping_variant_then_the_isolated_one():
    variants = [Variant((), None), Variant((X, B), 0.3), Variant((A, B), 0.2),
                Variant((Y, C), 0.1)]
    assert overlap((A, B), (A, B)) == 2 and overlap((X, B), (A, B)) == 1
    assert overlap((A, C), (A, B)) == 0  # the nearest chunk decides first
    assert choose(variants, (A, B)).context == (A, B)
    assert choose(variants, (Y, B)).context in {(X, B), (A, B)}
    assert choose(variants, (X, A)).context == ()  # no overlap: the chunk's own KV
    assert choose(variants[1:], (X, A)) is None  # ... and none cached: it is computed


def test_captured_variants_are_used_where_their_context_matches(engine):
    cache = MemoryChunkCache(1 << 30)
    planner = BlendPlanner(engine.loaded.model, engine.kv_spec, cache)
    seen = prompt_of(engine, [0, 1, 2])
    result = planner.plan(seen)  # cold: prefilled in full, its variants kept
    assert planner.stats.totals.cold == 1 and planner.stats.totals.captured == 2
    torch.testing.assert_close(flat(result, engine.kv_spec, seen), full_kv(engine, seen))
    variant = cache.variants(seen.chunks[2])
    assert [v.context for v in variant] == [context_of(seen.chunks, 2)]
    assert 0.0 < variant[0].dependence < 1.0
    # Chunk 0 moved to the end: chunk 2 still follows chunk 1 (one chunk of its context
    # matches); chunks 1 and 0 have no variant for where they are now (their own KV).
    result = planner.plan(prompt_of(engine, [1, 2, 0]))
    assert result.matched == (0, 1, 0)
    assert planner.stats.snapshot().variant_hits == 1


def test_budgets_stay_within_the_cap_and_follow_dependence():
    lengths = [100, 100, 100, 100]
    shares = dependence_shares([0.0, 0.1, 0.3, 0.6], lengths, cap_tokens=60, scale=1.0)
    assert shares[0] == 0.0  # no dependence: nothing recomputed
    assert shares[1] < shares[2] < shares[3]  # more dependence: more recomputed
    assert sum(s * n for s, n in zip(shares, lengths, strict=True)) <= 60 + 1e-9
    loose = dependence_shares([0.0, 0.1, 0.3], [100] * 3, cap_tokens=300, scale=1.0)
    assert loose == pytest.approx([0.0, 0.1, 0.3])  # under the cap: as measured
    weighted = dependence_shares([0.2, 0.2], [100, 100], 400, 1.0, relevance=[3.0, 1.0])
    assert weighted[0] > weighted[1]  # the chunk the question reads gets more


def test_the_dependence_budgets_of_a_blend_sum_within_the_ratio(engine):
    cache = MemoryChunkCache(1 << 30)
    planner = BlendPlanner(engine.loaded.model, engine.kv_spec, cache)
    for chunk in prompt_of(engine, [0, 1, 2]).chunks:
        planner._compute(cache, chunk)
    prompt = prompt_of(engine, [0, 1, 2], ratio=0.1)
    result = planner.plan(prompt)
    assert 0 < result.recomputed_tokens <= round(0.1 * prompt.num_chunk_tokens) + 3
    assert result.dependence is not None and len(result.dependence) == 3


def test_everything_recomputed_equals_full_prefill_whatever_the_variants(engine):
    cache = MemoryChunkCache(1 << 30)
    planner = BlendPlanner(engine.loaded.model, engine.kv_spec, cache)
    planner.plan(prompt_of(engine, [0, 1, 2, 3]))  # cold: leaves variants behind
    prompt = prompt_of(engine, [3, 1, 2, 0], ratio=1.0)
    for options in (DEFAULT_POLICY, CACHEBLEND):
        result = planner.plan(prompt, options=options)
        torch.testing.assert_close(flat(result, engine.kv_spec, prompt), full_kv(engine, prompt),
                                   atol=1e-4, rtol=1e-4)


def test_the_memory_chunk_cache_evicts_the_least_valuable_first():
    kv = torch.zeros(2, 2, 10, 1, 4)  # 10 tokens, 640 bytes
    cache = MemoryChunkCache(3 * 640)
    cache.put([1], kv, dependence=None)  # saves 10 tokens a use
    cache.put([2], kv, (A,), dependence=0.8)  # saves 2
    cache.put([3], kv, (A,), dependence=0.5)  # saves 5
    for _ in range(3):
        cache.layer([2], 0, (A,))  # ... but used four times as often
    order = [key[1] for key in cache.eviction_order()]
    assert order == [(3,), (2,), (1,)]
    assert chunk_value(3, 10, 0.8, 640) > chunk_value(0, 10, 0.5, 640)
    cache.put([4], kv)  # over capacity: the least valuable goes, not the least recent
    assert not cache.contains([3], (A,)) and cache.contains([1]) and cache.contains([2], (A,))


SPEC = KVSpec(num_layers=2, num_kv_heads=1, head_dim=4, dtype="float32", block_size=4)


def _kv(seed: int) -> KVBlocks:
    g = torch.Generator().manual_seed(seed)
    return KVBlocks(SPEC, 8, torch.randn(2, 2, 2, 4, 1, 4, generator=g))


def test_the_store_evicts_by_value_in_its_local_tiers():
    size = len(encode_object(_kv(0), "fp", get_codec("raw"), 0, 0.5))
    store = TieredStore([MemoryTier("cpu", 3 * size + size // 2)], "fp", SPEC, chunk_tokens=8)
    try:
        store.put("often", _kv(1), dependence=0.5)
        store.put("once", _kv(2), dependence=0.5)
        store.put("dependent", _kv(3), dependence=0.9)
        store.flush()
        for _ in range(3):
            assert store.get("often") is not None
        store.get("dependent")
        store.put("new", _kv(4), dependence=0.5)
        store.flush()
        # LRU would evict "once" (the least recently used); by value "dependent" goes: used
        # twice, but a blend recomputes 90% of it, so it saves the least per byte.
        assert not store.contains("dependent")
        assert store.contains("once") and store.contains("often") and store.contains("new")
    finally:
        store.close()


def test_a_variant_keeps_its_context_and_dependence_through_the_store(engine):
    s = engine.kv_spec
    store = TieredStore([MemoryTier("cpu", 1 << 28)], "fp", s, chunk_tokens=16)
    try:
        cache = StoreChunkCache(store)
        chunk, kv = list(range(300, 340)), torch.randn(s.num_layers, 2, 40, s.num_kv_heads,
                                                       s.head_dim)
        cache.put(chunk, kv, (A, B), dependence=0.25)
        store.flush()
        assert cache.contains(chunk, (A, B)) and not cache.contains(chunk)
        assert cache.variants(chunk) == [Variant((A, B), 0.25)]
        torch.testing.assert_close(cache.layer(chunk, 3, (A, B)), kv[3].to(s.torch_dtype))
        blob = store.tiers[0].get(cache.key(chunk, (A, B)))
        assert decode_object(blob, "fp", s).num_tokens == 40
        from tandem.kv_store.kv_object import read_header
        assert read_header(blob, "fp", s).dependence == 0.25
    finally:
        store.close()


def test_chunk_reuse_reaches_worker_stats_as_a_top_list_and_metrics_as_totals(engine):
    from prometheus_client import generate_latest

    from tandem.cluster.metrics import ClusterMetrics, WorkerFigures

    cache = MemoryChunkCache(1 << 30)
    planner = BlendPlanner(engine.loaded.model, engine.kv_spec, cache)
    planner.plan(prompt_of(engine, [0, 1, 2]))  # cold: two variants kept
    planner.plan(prompt_of(engine, [1, 2, 0]))
    planner.plan(prompt_of(engine, [1, 2, 0]))
    snap = planner.stats.snapshot(top_n=2)
    assert (snap.blends, snap.cold, snap.captured) == (2, 1, 2)
    assert snap.chunk_hits == 1 + 3 and snap.variant_hits == 2  # chunk 2 behind chunk 1, twice
    assert len(snap.top) == 2 and snap.top[0][1].saved_tokens >= snap.top[1][1].saved_tokens
    assert snap.top[0][0] in {chunk_hash(c) for c in prompt_of(engine, [0, 1, 2]).chunks}
    metrics = ClusterMetrics("m")
    metrics.workers = WorkerFigures(chunk_reuse={"variant_hits": 2, "saved_tokens": 300})
    page = generate_latest(metrics.registry).decode()
    assert 'tandem:chunk_cache_variant_hits_total{model_name="m"} 2.0' in page
    assert 'tandem:chunk_cache_saved_tokens_total{model_name="m"} 300.0' in page
    assert "chunk_hash" not in page and "chunk=" not in page  # no per-chunk labels
