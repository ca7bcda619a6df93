"""Sampling parameters through the public `LLM` API (bf16, the serving default)."""

from __future__ import annotations

import pytest

from tandem import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_gb=0.1)


PROMPT = "Tell me a story about a dragon and a knight."


def test_seeded_sampling_repeats_whatever_the_batch(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    alone = llm.generate(PROMPT, params)[0].token_ids
    noisy = SamplingParams(max_tokens=12, temperature=1.0)
    batched = llm.generate(["Other prompt", PROMPT, "Third"], [noisy, params, noisy])[1].token_ids
    assert alone == batched


def test_different_seeds_give_different_samples(llm):
    outs = [llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=1.5, seed=s))[0]
            for s in (1, 2)]
    assert outs[0].token_ids != outs[1].token_ids


def test_top_k_1_equals_greedy(llm):
    greedy = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0))[0]
    top1 = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=1.3, top_k=1))[0]
    assert top1.token_ids == greedy.token_ids


def test_tiny_top_p_equals_greedy(llm):
    greedy = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0))[0]
    nucleus = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=1.0,
                                                  top_p=1e-6, seed=3))[0]
    assert nucleus.token_ids == greedy.token_ids


def test_stop_string_cuts_text_exactly(llm):
    params = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
    full = llm.generate(PROMPT, SamplingParams(**params))[0].text
    words = full.split()
    stop = " ".join(words[3:5])  # a multi-token string in the middle of the output
    assert stop and full.count(stop) >= 1
    out = llm.generate(PROMPT, SamplingParams(**params, stop=[stop]))[0]
    assert out.text == full[:full.index(stop)]
    assert out.finish_reason == "stop"


def test_stop_token_ids_end_generation(llm):
    full = llm.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    stop_id = full.token_ids[4]
    out = llm.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                              stop_token_ids=[stop_id]))[0]
    assert out.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]
    assert out.finish_reason == "stop"


def test_max_tokens_ends_with_length(llm):
    out = llm.generate(PROMPT, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_generate_accepts_token_ids_and_lists(llm):
    ids = llm.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=6, temperature=0)
    by_text = llm.generate(PROMPT, params)[0]
    by_ids = llm.generate(ids, params)[0]
    both = llm.generate([PROMPT, ids], params)
    assert by_text.token_ids == by_ids.token_ids == both[0].token_ids == both[1].token_ids
    assert by_ids.prompt_token_ids == ids


def test_chat_uses_the_chat_template(llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(max_tokens=8, temperature=0)
    out = llm.chat(messages, params)[0]
    rendered = llm.tokenizer.apply_chat_template(messages)
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = llm.tokenizer.encode(rendered, add_special_tokens=False)
    assert out.prompt_token_ids == ids
    assert out.token_ids == llm.generate(ids, params)[0].token_ids


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", 0), ("max_tokens", 1.5), ("temperature", -0.1),
    ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
    ("seed", "x"), ("stop", [""]), ("stop_token_ids", [-1]),
])
def test_bad_params_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_bad_prompts_raise_value_error(llm):
    with pytest.raises(ValueError, match="prompts\\[0\\]"):
        llm.generate("")
    with pytest.raises(ValueError, match="prompts\\[1\\]"):
        llm.generate(["ok", 3.5])  # type: ignore[list-item]
    assert not llm.engine.has_unfinished_requests()
