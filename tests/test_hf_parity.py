"""The shipped model against HF transformers loading the same GGUF (fp32)."""

from __future__ import annotations

import math

import pytest
import torch

from tandem.engine.tokenizer import Tokenizer

from .conftest import DATA, greedy, run_to_completion

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "In 1492, Columbus sailed",
    "Water boils at 100 degrees Celsius, which is",
    "A long time ago in a galaxy far, far away",
]


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([ids])).logits[0].float()


def test_tokenizer_matches_hf(loaded_fp32, hf_tokenizer):
    tok: Tokenizer = loaded_fp32.tokenizer
    texts = [*PROMPTS, "Numbers 1234567 and 3.14159!", "naïve café — “quotes” 日本語",
             "<|im_start|>user\nhi<|im_end|>\n", "  leading spaces\n\n\ttabs"]
    for text in texts:
        assert tok.encode(text) == hf_tokenizer.encode(text), text
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids)


def test_chat_template_matches_hf(loaded_fp32, hf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2 + 2?"}]
    for msgs in (messages, messages[1:]):
        ours = loaded_fp32.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        theirs = hf_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert ours == theirs


def test_logits_match_hf_within_1e_3(make_engine, hf_model):
    engine = make_engine()
    for text in PROMPTS:
        ids = engine.tokenizer.encode(text)
        ours = engine.score(ids)
        diff = (ours - hf_logits(hf_model, ids)).abs().max().item()
        assert diff < 1e-3, (text, diff)


def test_greedy_continuations_match_hf(make_engine, hf_model):
    engine = make_engine()
    prompts = [engine.tokenizer.encode(t) for t in PROMPTS]
    ours = run_to_completion(engine, prompts, greedy(32))
    for prompt, tokens in zip(prompts, ours, strict=True):
        assert tokens == hf_greedy(hf_model, prompt, 32)


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    """Argmax decoding with HF's KV cache, never stopping early (no generate() policies)."""
    out, past, step = [], None, torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(n):
            res = hf_model(step, past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            step = torch.tensor([[out[-1]]])
    return out


def test_perplexity_matches_hf_within_1_percent(make_engine, hf_model):
    engine = make_engine()
    ids = engine.tokenizer.encode((DATA / "plain_english.txt").read_text())

    def perplexity(logits: torch.Tensor) -> float:
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
        return math.exp(nll.item())

    ours, theirs = perplexity(engine.score(ids)), perplexity(hf_logits(hf_model, ids))
    assert abs(ours - theirs) / theirs < 0.01, (ours, theirs)
    assert ours < 40, f"perplexity {ours:.1f} on plain English: are Q/K un-permuted?"


def test_bf16_serving_keeps_fp32_quality(loaded_bf16, make_engine):
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import LLMEngine

    ids = loaded_bf16.tokenizer.encode((DATA / "plain_english.txt").read_text())
    bf16 = LLMEngine(EngineConfig(kv_cache_gb=0.1), loaded=loaded_bf16)

    def perplexity(engine) -> float:
        logits = engine.score(ids)
        return math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])))

    fp32, half = perplexity(make_engine()), perplexity(bf16)
    assert half < fp32 * 1.03, (half, fp32)
