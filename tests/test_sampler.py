"""The counter-based sampler: draws are a pure function of (seed, position), follow the softmax,
respect top-k / top-p / min_tokens, and a bad row fails alone."""

from __future__ import annotations

import math

import pytest
import torch

from tandem.engine.sampler import Sampler, draw_key, lowbias32, uniforms
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.sequence import Sequence

VOCAB = 64


def seq(params: SamplingParams, num_output: int = 0, rid: str = "r") -> Sequence:
    s = Sequence(rid, [1, 2, 3], 3, params)
    s.token_ids.extend([5] * num_output)
    return s


def run(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence]):
    inputs = sampler.prepare(seqs)
    return sampler.collect(sampler.sample(logits, inputs), inputs)


def python_lowbias32(x: int) -> int:
    """The hash with explicit 32-bit masking: what the tensor version must equal."""
    m = 0xFFFFFFFF
    x &= m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_tensor_hash_equals_the_masked_integer_reference():
    values = [0, 1, 2, 7, 12345, 2**31 - 1, -1, -2**31, 987654321, -123456789]
    got = lowbias32(torch.tensor(values, dtype=torch.int32)).tolist()
    assert [g & 0xFFFFFFFF for g in got] == [python_lowbias32(v) for v in values]


def test_uniforms_lie_strictly_inside_the_unit_interval():
    basis = lowbias32(torch.arange(VOCAB, dtype=torch.int32))
    u = uniforms(torch.tensor([draw_key(s, i) for s in range(4) for i in range(8)],
                              dtype=torch.int32), basis)
    assert u.dtype == torch.float32 and bool((u > 0).all()) and bool((u < 1).all())
    assert 0.45 < float(u.mean()) < 0.55


def test_a_draw_does_not_depend_on_batch_mates_or_row():
    sampler = Sampler(VOCAB, None, torch.device("cpu"))
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=0.8, seed=11)
    alone = run(sampler, logits[2:3], [seq(p, 5)]).token_ids[0]
    mates = [seq(SamplingParams(temperature=1.3, top_k=5, seed=s)) for s in (1, 2, 3)]
    batched = run(sampler, logits[[0, 1, 2, 3]], [mates[0], mates[1], seq(p, 5), mates[2]])
    assert batched.token_ids[2] == alone


def test_draws_follow_the_softmax():
    """Chi-square of 20,000 draws (one per output position) against softmax(logits / T)."""
    sampler = Sampler(8, None, torch.device("cpu"))
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    temperature, n = 0.7, 20_000
    seqs = [seq(SamplingParams(temperature=temperature, seed=42), i) for i in range(n)]
    drawn = torch.tensor(run(sampler, logits.expand(n, 8).contiguous(), seqs).token_ids)
    observed = torch.bincount(drawn, minlength=8).double()
    expected = (logits / temperature).softmax(0).double() * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 24.32, f"chi-square {chi2:.1f} over 7 degrees of freedom (p < 0.001)"


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    sampler = Sampler(VOCAB, None, torch.device("cpu"))
    logits = torch.linspace(3, -3, VOCAB).expand(400, VOCAB).contiguous()  # token 0 most likely
    top_k = run(sampler, logits, [seq(SamplingParams(temperature=2.0, top_k=3, seed=1), i)
                                  for i in range(400)]).token_ids
    assert set(top_k) == {0, 1, 2}
    probs = (logits[0] / 2.0).softmax(0)
    nucleus = int((probs.cumsum(0) - probs < 0.5).sum())  # tokens whose prior mass is < top_p
    top_p = run(sampler, logits, [seq(SamplingParams(temperature=2.0, top_p=0.5, seed=2), i)
                                  for i in range(400)]).token_ids
    assert set(top_p) == set(range(nucleus))


def test_out_of_range_settings_do_not_fail_the_batch():
    sampler = Sampler(VOCAB, None, torch.device("cpu"))
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(3))
    seqs = [seq(SamplingParams(temperature=1e-39)), seq(SamplingParams(top_k=10**6, seed=4)),
            seq(SamplingParams(temperature=0))]
    out = run(sampler, logits, seqs)
    assert out.errors == [None, None, None]
    assert out.token_ids[0] == int(logits[0].argmax())  # a temperature below 1e-5 is greedy
    assert out.token_ids[2] == int(logits[2].argmax())


def test_non_finite_logits_fail_their_row_alone():
    sampler = Sampler(VOCAB, None, torch.device("cpu"))
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(5))
    logits[1, 7] = float("nan")
    out = run(sampler, logits, [seq(SamplingParams(temperature=0)),
                                seq(SamplingParams(seed=1)), seq(SamplingParams(seed=2))])
    assert out.errors[0] is None and out.errors[2] is None
    assert "non-finite" in out.errors[1]


def test_min_tokens_and_stop_ids_are_banned_until_reached():
    eos = 9
    sampler = Sampler(VOCAB, eos, torch.device("cpu"))
    logits = torch.full((2, VOCAB), -5.0)
    logits[:, eos] = 10.0  # EOS dominates ...
    logits[:, 4] = 9.0  # ... then the stop id ...
    logits[:, 6] = 1.0  # ... then this one
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[4])
    early, late = seq(params, 1), seq(params, 3)
    out = run(sampler, logits, [early, late])
    assert out.token_ids == [6, eos]


def test_logprobs_are_the_raw_log_softmax_before_temperature():
    sampler = Sampler(VOCAB, None, torch.device("cpu"))
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(6))
    out = run(sampler, logits, [seq(SamplingParams(temperature=0.5, seed=3, logprobs=3)),
                                seq(SamplingParams(temperature=0))])
    want = logits[0].log_softmax(0)
    got = out.logprobs[0]
    assert math.isclose(got.logprob, float(want[out.token_ids[0]]), rel_tol=1e-6)
    top = want.topk(3)
    assert [t for t, _ in got.top] == top.indices.tolist()
    assert [v for _, v in got.top] == pytest.approx(top.values.tolist(), rel=1e-6)
    assert out.logprobs[1] is None
