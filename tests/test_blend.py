"""CacheBlend in the engine: RoPE correction, full recompute equals full prefill, full reuse
runs no layer, and the default ratio more than halves the divergence of full reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tandem.engine.blend import blend, shift_keys
from tandem.engine.kv_cache import KVBlocks

from .conftest import greedy, run_to_completion

TEXT = (Path(__file__).parents[1] / "bench" / "data" / "harbour.txt").read_text()


@pytest.fixture(scope="module")
def engine(loaded_fp32):
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import LLMEngine

    return LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.2, num_threads=2,
                                  enable_prefix_caching=False), loaded=loaded_fp32)


def dense_kv(engine, ids: list[int]) -> torch.Tensor:
    """The KV of `ids` computed on their own from position 0: [layers, 2, n, heads, dim]."""
    engine.add_request("kv", ids, greedy(1), prefill_only=True)
    while not engine.step():
        pass
    kv = engine.export_kv("kv")
    engine.release("kv")
    s = engine.kv_spec
    return kv.data.reshape(s.num_layers, 2, -1, s.num_kv_heads, s.head_dim)[:, :, :len(ids)]


def blended(engine, prefix: list[int], chunks: list[list[int]], ratio: float):
    """Blend `chunks` (each computed alone) after `prefix` (computed exactly)."""
    s = engine.kv_spec
    padded = torch.zeros(s.num_layers, 2, s.num_blocks_for(len(prefix)) * s.block_size,
                         s.num_kv_heads, s.head_dim)
    padded[:, :, :len(prefix)] = dense_kv(engine, prefix)
    prefix_blocks = KVBlocks(s, len(prefix), padded.view(
        s.num_layers, 2, -1, s.block_size, s.num_kv_heads, s.head_dim))
    alone = torch.cat([dense_kv(engine, chunk) for chunk in chunks], dim=2)
    return blend(engine.loaded.model, s, prefix_blocks, [], chunks, lambda i: alone[i], ratio)


def split_text(engine):
    ids = engine.tokenizer.encode(TEXT)
    prefix, chunks = ids[:24], [ids[100:160], ids[400:470], ids[800:850]]
    question = engine.tokenizer.encode("\n\nQuestion: What did the keeper keep?\nAnswer:",
                                       add_special_tokens=False)
    return prefix, chunks, question


def test_keys_moved_to_an_offset_equal_keys_computed_there(engine):
    ids = engine.tokenizer.encode(TEXT)[:80]
    alone = dense_kv(engine, ids[40:])
    within = dense_kv(engine, ids)
    moved = shift_keys(engine.loaded.model, alone[0, 0], 40)
    assert torch.allclose(moved, within[0, 0, 40:], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(alone[0, 0], within[0, 0, 40:], atol=1e-2)  # RoPE did differ
    back = shift_keys(engine.loaded.model, within[0, 0, 40:], -40)  # and back to position 0
    assert torch.allclose(back, alone[0, 0], atol=1e-5, rtol=1e-4)


def test_full_recompute_equals_full_prefill(engine):
    prefix, chunks, question = split_text(engine)
    result = blended(engine, prefix, chunks, 1.0)
    prompt = prefix + [t for c in chunks for t in c] + question
    full = dense_kv(engine, prompt[:result.kv.num_tokens])
    s = engine.kv_spec
    got = result.kv.data.reshape(s.num_layers, 2, -1, s.num_kv_heads, s.head_dim)
    assert torch.allclose(got[:, :, :result.kv.num_tokens], full, atol=1e-4, rtol=1e-3)
    assert result.recomputed_tokens == sum(map(len, chunks))
    want = run_to_completion(engine, [prompt], greedy(8))[0]
    engine.add_request("b", prompt, greedy(8), prefix_kv=result.kv)
    got_tokens = None
    while got_tokens is None:
        got_tokens = next((o.token_ids for o in engine.step() if o.finished), None)
    assert got_tokens == want


def test_full_reuse_runs_no_layer_for_chunk_tokens(engine):
    prefix, chunks, _ = split_text(engine)
    result = blended(engine, prefix, chunks, 0.0)
    assert result.recomputed_tokens == 0
    s = engine.kv_spec
    got = result.kv.data.reshape(s.num_layers, 2, -1, s.num_kv_heads, s.head_dim)
    first = dense_kv(engine, chunks[0])
    n = len(prefix)
    assert torch.equal(got[:, 1, n:n + len(chunks[0])], first[:, 1])  # values as loaded
    assert torch.allclose(got[:, 0, n:n + len(chunks[0])], torch.stack(
        [shift_keys(engine.loaded.model, first[layer, 0], n) for layer in range(s.num_layers)]))


def next_token_kl(engine, prompt: list[int], kv: KVBlocks, exact: torch.Tensor) -> float:
    logits = engine.score(prompt, prefix_kv=kv)[-1]
    q = torch.log_softmax(logits.float(), -1)
    return float((exact.exp() * (exact - q)).sum())


def test_default_ratio_halves_the_divergence_of_full_reuse(engine):
    ids = engine.tokenizer.encode(TEXT)
    question = split_text(engine)[2]
    built = [(ids[:24], [ids[100:160], ids[400:470], ids[800:850]]),
             (ids[:40], [ids[900:990], ids[300:380]]),
             (ids[:10], [ids[1200:1260], ids[1500:1590], ids[600:660]]),
             (ids[:30], [ids[2000:2100], ids[1700:1780]])]
    reuse, blend_kl = [], []
    for prefix, chunks in built:
        prompt = prefix + [t for c in chunks for t in c] + question
        exact = torch.log_softmax(engine.score(prompt)[-1].float(), -1)
        reuse.append(next_token_kl(engine, prompt, blended(engine, prefix, chunks, 0.0).kv,
                                   exact))
        result = blended(engine, prefix, chunks, 0.15)
        assert result.recomputed_tokens == round(0.15 * sum(map(len, chunks)))
        blend_kl.append(next_token_kl(engine, prompt, result.kv, exact))
    assert sum(blend_kl) < sum(reuse) / 2, (blend_kl, reuse)


def test_the_next_layer_is_fetched_while_a_layer_computes(engine):
    """Layer i's compute waits until layer i + 1's fetch has begun: without prefetching it
    would wait in vain."""
    import threading

    prefix, chunks, _ = split_text(engine)
    alone = torch.cat([dense_kv(engine, chunk) for chunk in chunks], dim=2)
    layers = engine.loaded.model.layers
    started = [threading.Event() for _ in layers]
    overlapped = []

    def fetch(i: int) -> torch.Tensor:
        started[i].set()
        return alone[i]

    def before_compute(i: int):
        def hook(module, args):
            if i + 1 < len(layers):
                overlapped.append(started[i + 1].wait(2))
        return hook

    handles = [layer.self_attn.qkv_proj.register_forward_pre_hook(before_compute(i))
               for i, layer in enumerate(layers)]
    try:
        blend(engine.loaded.model, engine.kv_spec, None, prefix, chunks, fetch, 0.15)
    finally:
        for handle in handles:
            handle.remove()
    assert len(overlapped) == len(layers) - 1 and all(overlapped)


def test_llm_serves_segmented_prompts_and_keeps_blended_kv_out_of_its_prefix_cache(
        loaded_fp32):
    from tandem.engine.chunk_cache import MemoryChunkCache
    from tandem.engine.chunk_variants import context_of
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import LLMEngine
    from tandem.engine.llm import LLM

    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.2, num_threads=2),
                       loaded=loaded_fp32)
    cache = MemoryChunkCache(1 << 30)
    llm = LLM.from_engine(engine, cache)
    paragraphs = [p for p in TEXT.split("\n") if len(p) > 300]
    segments = [paragraphs[0], paragraphs[1], paragraphs[2], "Question: Who kept it?\nAnswer:"]
    tokens = [engine.tokenizer.encode(s, add_special_tokens=False) for s in segments[1:3]]
    # Cold (no chunk cached): prefilled in full, exactly; its chunks' KV kept as variants.
    first = llm.generate({"segments": segments}, greedy(4))[0]
    assert first.num_cached_tokens == 0
    assert first.num_recomputed_tokens == sum(map(len, tokens))
    assert [v.context for v in cache.variants(tokens[1])] == [context_of(tokens, 1)]
    exact = llm.generate({"segments": segments, "blend": False}, greedy(4))[0]
    assert exact.num_recomputed_tokens == 0 and exact.token_ids == first.token_ids
    # In another order after another prefix: the chunks are blended (the first computed on
    # its own, the second from its variant), and nothing past the prefix enters the prefix
    # cache: the same tokens as one plain prompt find only the prefix's blocks.
    other = ["Another prefix, for another reader.", segments[1], segments[2], segments[3]]
    again = llm.generate({"segments": other}, greedy(4))[0]
    prefix_blocks = len(engine.tokenizer.encode(other[0])) // engine.config.block_size
    assert again.num_recomputed_tokens > 0
    assert again.num_cached_tokens == prefix_blocks * engine.config.block_size + len(tokens[1])
    plain = llm.generate(again.prompt_token_ids, greedy(4))[0]
    assert plain.num_cached_tokens == prefix_blocks * engine.config.block_size
    with pytest.raises(ValueError, match="recompute_ratio"):
        llm.generate({"segments": segments, "recompute_ratio": 2})
    with pytest.raises(ValueError, match=r"segments\[1\]"):
        llm.generate({"segments": ["", "", "question"]})
    with pytest.raises(ValueError, match="keys"):
        llm.generate({"segments": segments, "ratio": 0.2})


def test_a_chunk_evicted_during_the_blend_is_computed_and_the_blend_redone(engine):
    from tandem.engine.blend_planner import BlendPlanner
    from tandem.engine.blend_select import CACHEBLEND
    from tandem.engine.chunk_cache import MemoryChunkCache
    from tandem.engine.segments import SegmentedPrompt

    prefix, chunks, question = split_text(engine)
    prompt = SegmentedPrompt(prefix, chunks, question)
    cache = MemoryChunkCache(1 << 30)
    model, spec = engine.loaded.model, engine.kv_spec
    # CacheBlend (no cold prefill): computes every chunk on its own and caches it
    want = BlendPlanner(model, spec, cache).plan(prompt, options=CACHEBLEND)

    class Forgetful(MemoryChunkCache):
        """Loses the second chunk once layer 5 is asked for."""

        def layer(self, token_ids, layer, context=()):
            if token_ids == chunks[1] and layer == 5 and not forgotten:
                forgotten.append(True)
                return None
            return cache.layer(token_ids, layer, context)

        def contains(self, token_ids, context=()):
            return cache.contains(token_ids, context)

        def variants(self, token_ids):
            return cache.variants(token_ids)

    forgotten: list[bool] = []
    got = BlendPlanner(model, spec, Forgetful(0)).plan(prompt, options=CACHEBLEND)
    assert forgotten and torch.equal(got.kv.data, want.kv.data)
    assert got.cached_tokens == len(chunks[0]) + len(chunks[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_blending_on_the_gpu_matches_the_cpu(engine):
    from tandem.engine.loader import load_model

    prefix, chunks, _ = split_text(engine)
    alone = torch.cat([dense_kv(engine, chunk) for chunk in chunks], dim=2)
    gpu = load_model(None, torch.float32, torch.device("cuda"))
    for ratio in (1.0, 0.15):  # at 1 no selection: the KV must agree; below, the counts
        want = blend(engine.loaded.model, engine.kv_spec, None, prefix, chunks,
                     lambda i: alone[i], ratio)
        got = blend(gpu.model, engine.kv_spec, None, prefix, chunks, lambda i: alone[i], ratio)
        assert got.kv.data.device.type == "cpu"
        assert got.recomputed_tokens == want.recomputed_tokens
        if ratio == 1.0:
            assert torch.allclose(got.kv.data, want.kv.data, atol=2e-3, rtol=1e-3)
