"""Presence, frequency and repetition penalties (vLLM's rules) and prompt logprobs: validated,
neutral when neutral, equal to a reference computed independently from teacher-forced logits,
isolated per row, reproducible when seeded; logprobs stay those of the raw logits."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from tandem.engine.penalties import apply_penalties
from tandem.engine.prompt_logprobs import prompt_logprobs
from tandem.engine.sampler import Sampler
from tandem.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from tandem.engine.sequence import Sequence

from .conftest import run_to_completion

VOCAB = 64
PENALIZED = {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.4}
TEXT = "The cat sat on the mat. The cat sat on the"


def reference_penalized(logits: torch.Tensor, prompt: list[int], output: list[int],
                        presence_penalty: float, frequency_penalty: float,
                        repetition_penalty: float) -> torch.Tensor:
    """vLLM's rules, token by token in float32, written apart from the batched version."""
    out = logits.clone()
    for token in set(prompt) | set(output):
        x = out[token]
        out[token] = x / repetition_penalty if x > 0 else x * repetition_penalty
    for token, count in Counter(output).items():
        out[token] = (out[token] - torch.tensor(frequency_penalty) * count
                      - torch.tensor(presence_penalty))
    return out


def seq(params: SamplingParams, prompt: list[int], output: list[int], rid: str = "r") -> Sequence:
    s = Sequence(rid, list(prompt), len(prompt), params)
    s.token_ids.extend(output)
    return s


def generate(engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], list]:
    engine.add_request("g", prompt, params)
    while True:
        for out in engine.step():
            if out.finished:
                return out.token_ids, out.logprobs


@pytest.fixture(scope="module")
def engine(loaded_fp32):
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import LLMEngine

    return LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1), loaded=loaded_fp32)


@pytest.fixture(scope="module")
def prompt(engine) -> list[int]:
    return engine.tokenizer.encode(TEXT)


# -- parameters ------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [
    ("presence_penalty", 2.5), ("presence_penalty", -3.0), ("presence_penalty", math.nan),
    ("presence_penalty", True), ("frequency_penalty", math.inf), ("frequency_penalty", -2.01),
    ("frequency_penalty", "1"), ("frequency_penalty", 10**400), ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0), ("repetition_penalty", 2.5), ("repetition_penalty", math.nan),
    ("repetition_penalty", None), ("repetition_penalty", False)])
def test_bad_penalties_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}="):
        SamplingParams(**{field: value})


def test_edges_are_accepted_and_neutral_values_are_no_penalty():
    assert not SamplingParams().has_penalties
    assert not SamplingParams(presence_penalty=0, frequency_penalty=0.0,
                              repetition_penalty=1).has_penalties
    for kwargs in ({"presence_penalty": -2}, {"frequency_penalty": 2.0},
                   {"repetition_penalty": 2}, {"repetition_penalty": 1e-3}):
        assert SamplingParams(**kwargs).has_penalties


# -- the sampler, on synthetic logits ------------------------------------------------------

def test_batched_penalties_equal_the_reference_and_leave_other_rows_exact():
    sampler = Sampler(VOCAB, None, torch.device("cpu"))
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    prompt, output = [1, 2, 3, 3, 40], [3, 7, 7, 7, 50, 1]
    settings = [PENALIZED, {}, {"frequency_penalty": -1.5}, {"repetition_penalty": 0.6,
                                                           "presence_penalty": 2.0}]
    seqs = [seq(SamplingParams(temperature=0, **s), prompt, output, f"r{i}")
            for i, s in enumerate(settings)]
    inputs = sampler.prepare(seqs)
    got = apply_penalties(logits, inputs.penalties)
    for row, s in enumerate(settings):
        want = reference_penalized(logits[row], prompt, output, s.get("presence_penalty", 0.0),
                                   s.get("frequency_penalty", 0.0),
                                   s.get("repetition_penalty", 1.0))
        assert torch.equal(got[row], want), row
    assert torch.equal(got[1], logits[1])


def test_no_penalty_in_the_batch_means_no_penalty_work():
    sampler = Sampler(VOCAB, None, torch.device("cpu"))
    assert sampler.prepare([seq(SamplingParams(), [1, 2], [3])]).penalties is None
    # Output-only penalties before any output token have nothing to act on either.
    assert sampler.prepare([seq(SamplingParams(presence_penalty=1), [1, 2], [])]).penalties is None


def test_min_tokens_bans_still_apply_after_penalties():
    eos = 9
    sampler = Sampler(VOCAB, eos, torch.device("cpu"))
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, eos], logits[0, 4], logits[0, 6] = 10.0, 9.0, 5.0
    params = SamplingParams(temperature=0, min_tokens=3, repetition_penalty=2.0)
    inputs = sampler.prepare([seq(params, [4], [])])  # 4 is in the prompt: 9.0 -> 4.5
    assert sampler.collect(sampler.sample(logits, inputs), inputs).token_ids == [6]


# -- the engine (fp32, so comparisons can be exact) ----------------------------------------

def test_neutral_penalties_give_the_same_tokens(engine, prompt):
    for base in ({"temperature": 0}, {"temperature": 0.8, "seed": 5}):
        plain = SamplingParams(max_tokens=6, ignore_eos=True, **base)
        neutral = SamplingParams(max_tokens=6, ignore_eos=True, presence_penalty=0.0,
                                 frequency_penalty=0.0, repetition_penalty=1.0, **base)
        assert generate(engine, prompt, neutral)[0] == generate(engine, prompt, plain)[0]


def test_greedy_penalized_tokens_follow_the_reference(engine, prompt):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, **PENALIZED)
    tokens, _ = generate(engine, prompt, params)
    plain, _ = generate(engine, prompt, SamplingParams(max_tokens=8, temperature=0,
                                                       ignore_eos=True))
    assert tokens != plain  # the penalties must matter here, or this test proves nothing
    for i, token in enumerate(tokens):
        logits = engine.score(prompt + tokens[:i])[-1]
        want = reference_penalized(logits, prompt, tokens[:i], **PENALIZED)
        assert token == int(want.argmax()), i


def test_a_mixed_batch_gives_each_request_its_tokens_alone(make_engine, engine, prompt):
    other = engine.tokenizer.encode("Once upon a time")
    cases = [(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, **PENALIZED)),
             (other, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)),
             (other, SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True,
                                    frequency_penalty=1.0)),
             (prompt, SamplingParams(max_tokens=6, temperature=0.8, seed=4, ignore_eos=True))]
    alone = [generate(engine, p, params)[0] for p, params in cases]
    batched = run_to_completion(make_engine(), [p for p, _ in cases], [s for _, s in cases])
    assert batched == alone


def test_seeded_penalized_sampling_repeats(engine, prompt):
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=11, ignore_eos=True, **PENALIZED)
    first = generate(engine, prompt, params)[0]
    assert generate(engine, prompt, params)[0] == first
    plain = SamplingParams(max_tokens=6, temperature=0.8, seed=11, ignore_eos=True)
    assert generate(engine, prompt, plain)[0] != first


def test_logprobs_with_penalties_are_the_raw_log_softmax(engine, prompt):
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3,
                            **PENALIZED)
    tokens, logprobs = generate(engine, prompt, params)
    for i, (token, got) in enumerate(zip(tokens, logprobs, strict=True)):
        raw = engine.score(prompt + tokens[:i])[-1].log_softmax(0)
        assert got.logprob == pytest.approx(float(raw[token]), abs=1e-4)
        top = raw.topk(3)
        assert [t for t, _ in got.top] == top.indices.tolist()
        assert [v for _, v in got.top] == pytest.approx(top.values.tolist(), abs=1e-4)


# -- prompt logprobs -------------------------------------------------------------------------

@pytest.mark.slow
def test_prompt_logprobs_match_hf(engine, hf_model):
    ids = engine.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    got = prompt_logprobs(engine, ids, 5)
    with torch.inference_mode():
        want = hf_model(torch.tensor([ids])).logits[0].float().log_softmax(dim=1)
    assert len(got) == len(ids) - 1
    for i, entry in enumerate(got):
        row = want[i]  # position i predicts token i + 1
        assert entry.logprob == pytest.approx(float(row[ids[i + 1]]), abs=1e-4)
        assert [t for t, _ in entry.top] == row.topk(5).indices.tolist()
        values = [v for _, v in entry.top]
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(row.topk(5).values.tolist(), abs=1e-4)


def test_prompt_logprobs_edges(engine, prompt):
    assert prompt_logprobs(engine, prompt[:1], 5) == []
    assert all(entry.top == [] for entry in prompt_logprobs(engine, prompt[:3], 0))
    for bad in (-1, MAX_LOGPROBS + 1, True):
        with pytest.raises(ValueError, match=r"^top_n="):
            prompt_logprobs(engine, prompt, bad)
    with pytest.raises(ValueError, match="token_ids"):
        prompt_logprobs(engine, [], 1)
    with pytest.raises(ValueError, match="token_ids"):
        prompt_logprobs(engine, [10**9], 1)
