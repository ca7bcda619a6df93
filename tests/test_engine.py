"""Engine behaviour on the real model (fp32): every execution path gives the same greedy tokens."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.errors import EngineError, OutOfBlocksError
from tandem.engine.kv_cache import KVBlocks
from tandem.engine.sampling_params import SamplingParams

from .conftest import greedy, run_to_completion

TEXTS = [
    "The river ran past the old mill and into the valley, where",
    "Write a short poem about the sea:",
    "List three prime numbers:",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker who repaired every clock in the region. One winter morning",
    "Q: What is the boiling point of water?\nA:",
]


@pytest.fixture(scope="module")
def prompts(loaded_fp32) -> list[list[int]]:
    return [loaded_fp32.tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def reference(loaded_fp32, prompts) -> list[list[int]]:
    """One prompt at a time, whole prefill, no prefix caching."""
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1,
                                    enable_prefix_caching=False), loaded=loaded_fp32)
    return [run_to_completion(engine, [p], greedy(24))[0] for p in prompts]


def test_batch_of_mixed_lengths_matches_one_by_one(make_engine, prompts, reference):
    assert run_to_completion(make_engine(), prompts, greedy(24)) == reference


def test_contiguous_kv_matches_paged(make_engine, prompts, reference):
    # One block larger than any sequence is a contiguous cache.
    engine = make_engine(block_size=256, enable_prefix_caching=False)
    assert run_to_completion(engine, prompts, greedy(24)) == reference


def test_chunked_prefill_matches_whole_prefill(make_engine, prompts, reference):
    engine = make_engine(max_num_batched_tokens=8, max_num_seqs=4)
    assert run_to_completion(engine, prompts, greedy(24)) == reference


def test_prefix_cache_hit_matches_miss(make_engine, prompts, reference):
    engine = make_engine(block_size=4)
    run_to_completion(engine, [prompts[3]], greedy(24))
    hits_before = engine.stats().num_prefix_hit_blocks
    assert run_to_completion(engine, [prompts[3]], greedy(24)) == [reference[3]]
    assert engine.stats().num_prefix_hit_blocks > hits_before


def test_preemption_by_recompute_keeps_outputs(make_engine, prompts, reference):
    engine = make_engine(num_kv_blocks=12, block_size=8)  # too few blocks for all five at once
    assert run_to_completion(engine, prompts, greedy(24)) == reference
    stats = engine.stats()
    assert stats.num_preemptions > 0
    assert stats.num_free_blocks == stats.num_blocks


def test_export_then_import_continues_identically(make_engine, prompts, reference):
    prefill, decode = make_engine(), make_engine()
    for i, prompt in enumerate(prompts):
        prefill.add_request(f"p{i}", prompt, greedy(24), prefill_only=True)
        outs = []
        while not outs:
            outs = prefill.step()
        kv = prefill.export_kv(f"p{i}")
        prefill.release(f"p{i}")
        assert kv.num_tokens == len(prompt)
        decode.import_request(f"d{i}", prompt, outs[0].token_ids, greedy(24), kv)
    got = {}
    while decode.has_unfinished_requests():
        got.update((o.request_id, o.token_ids) for o in decode.step() if o.finished)
    assert [got[f"d{i}"] for i in range(len(prompts))] == reference
    for engine in (prefill, decode):
        assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_reserved_blocks_adopt_the_kv_and_continue_identically(make_engine, prompts, reference):
    prefill, decode = make_engine(), make_engine()
    prompt = prompts[3]
    held = decode.reserve("d", prompt, greedy(24))
    assert len(held) == decode.kv_spec.num_blocks_for(len(prompt))
    assert decode.stats().num_reserved == 1 and not decode.has_unfinished_requests()
    prefill.add_request("p", prompt, greedy(24), prefill_only=True)
    first = []
    while not first:
        first = prefill.step()
    out = decode.adopt("d", prefill.export_kv("p"), first[0].token_ids)
    assert out.token_ids == first[0].token_ids and not out.finished
    while decode.has_unfinished_requests():
        done = [o for o in decode.step() if o.finished]
        if done:
            out = done[0]
    assert out.token_ids == reference[3]


def test_reserve_beyond_free_blocks_is_out_of_blocks(make_engine, prompts):
    engine = make_engine(num_kv_blocks=8)
    engine.reserve("a", [5] * 100, greedy(8))
    with pytest.raises(OutOfBlocksError, match="free"):
        engine.reserve("b", [6] * 40, greedy(8))
    engine.abort("a")  # a reserved request frees its blocks like any other
    assert engine.stats().num_free_blocks == 8 and engine.stats().num_reserved == 0


def test_adopted_request_larger_than_the_free_pool_still_runs(make_engine, prompts):
    prefill, decode = make_engine(), make_engine(num_kv_blocks=10)
    prompt = list(range(1000, 1100))  # 7 of the 10 blocks: more than what stays free
    prefill.add_request("p", prompt, greedy(4), prefill_only=True)
    first = []
    while not first:
        first = prefill.step()
    decode.reserve("d", prompt, greedy(4))
    decode.adopt("d", prefill.export_kv("p"), first[0].token_ids)
    outs = []
    for _ in range(20):
        outs += [o for o in decode.step() if o.finished]
        if outs:
            break
    assert outs and len(outs[0].token_ids) == 4


def test_adopt_refuses_tokens_outside_the_vocabulary(make_engine, prompts):
    prefill, decode = make_engine(), make_engine()
    prefill.add_request("p", prompts[0], greedy(4), prefill_only=True)
    while not prefill.step():
        pass
    decode.reserve("d", prompts[0], greedy(4))
    with pytest.raises(ValueError, match="vocabulary"):
        decode.adopt("d", prefill.export_kv("p"), [10**9])


def test_adopting_a_finishing_token_ends_the_request_at_once(make_engine, prompts):
    prefill, decode = make_engine(), make_engine()
    prefill.add_request("p", prompts[0], greedy(1), prefill_only=True)
    first = []
    while not first:
        first = prefill.step()
    decode.reserve("d", prompts[0], greedy(1))
    out = decode.adopt("d", prefill.export_kv("p"), first[0].token_ids)
    assert out.finish_reason == "length" and out.token_ids == first[0].token_ids
    assert decode.stats().num_free_blocks == decode.stats().num_blocks


def test_layer_callback_streams_every_layer_before_the_first_token(make_engine, prompts):
    engine = make_engine(max_num_batched_tokens=16, max_num_seqs=4)  # several chunks
    seen: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
    engine.add_request("a", prompts[3], greedy(4), prefill_only=True,
                       on_layer_kv=lambda layer, pos, k, v: seen.append(
                           (layer, pos, k.clone(), v.clone())))
    while not engine.step():
        pass
    kv = engine.export_kv("a")
    layers = engine.kv_spec.num_layers
    flat = kv.data.flatten(2, 3)  # [layers, 2, tokens, heads, dim]
    for layer in range(layers):
        parts = [(pos, k, v) for lay, pos, k, v in seen if lay == layer]
        assert [p for p, _, _ in parts] == sorted(p for p, _, _ in parts)
        keys = torch.cat([k for _, k, _ in parts])
        values = torch.cat([v for _, _, v in parts])
        assert keys.shape[0] == len(prompts[3])
        assert torch.equal(keys, flat[layer, 0, :kv.num_tokens])
        assert torch.equal(values, flat[layer, 1, :kv.num_tokens])
    # Chunk by chunk, layer 0 of a chunk is handed over before that chunk's last layer.
    assert [lay for lay, *_ in seen[:layers]] == list(range(layers))


def test_prefix_kv_start_matches_full_prefill(make_engine, prompts, reference):
    engine = make_engine()
    prefix = prompts[3][:20]
    engine.add_request("prefix", prefix, greedy(1), prefill_only=True)
    while not engine.step():
        pass
    kv = engine.export_kv("prefix")
    engine.release("prefix")
    fresh = make_engine()
    fresh.add_request("full", prompts[3], greedy(24), prefix_kv=kv)
    outs = []
    while fresh.has_unfinished_requests():
        outs += [o for o in fresh.step() if o.finished]
    assert outs[0].token_ids == reference[3]
    assert outs[0].num_cached_tokens == 20


def test_import_rejects_kv_of_another_layout(make_engine, prompts):
    engine = make_engine()
    other = make_engine(block_size=8).kv_spec
    kv = KVBlocks(other, 3, torch.zeros(other.num_layers, 2, 1, 8, other.num_kv_heads,
                                        other.head_dim))
    with pytest.raises(ValueError, match="KV spec mismatch"):
        engine.import_request("x", prompts[0][:3], [1], greedy(4), kv)


def test_abort_frees_blocks(make_engine, prompts):
    engine = make_engine()
    engine.add_request("a", prompts[3], greedy(50))
    engine.step()
    assert engine.stats().num_free_blocks < engine.stats().num_blocks
    out = engine.abort("a")
    assert out is not None and out.finish_reason == "abort"
    assert engine.stats().num_free_blocks == engine.stats().num_blocks
    assert not engine.has_unfinished_requests()
    assert engine.abort("unknown") is None


@pytest.mark.parametrize(("prompt", "params", "match"), [
    ([], greedy(4), "prompt: is empty"),
    ([1, 2, 10**9], greedy(4), "outside the vocabulary"),
    ([1] * 9000, greedy(4), "max_model_len"),
    ([1, 2, 3], SamplingParams(max_tokens=10**7), "max_tokens"),
])
def test_bad_requests_raise_value_error_naming_the_field(make_engine, prompt, params, match):
    engine = make_engine()
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished_requests()


def test_export_of_unfinished_prefill_is_refused(make_engine, prompts):
    engine = make_engine()
    engine.add_request("a", prompts[0], greedy(4))
    with pytest.raises(EngineError, match="not prefilled"):
        engine.export_kv("a")


def test_stop_at_eos_unless_ignored(make_engine):
    engine = make_engine()
    chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}])
    prompt = engine.tokenizer.encode(chat, add_special_tokens=False)
    stopped = run_to_completion(engine, [prompt], SamplingParams(max_tokens=200, temperature=0))
    assert stopped[0][-1] == engine.tokenizer.eos_token_id and len(stopped[0]) < 200
    kept = run_to_completion(engine, [prompt], greedy(len(stopped[0]) + 3))
    assert kept[0][:len(stopped[0])] == stopped[0] and len(kept[0]) == len(stopped[0]) + 3
