"""The sampling options of the gRPC API through the real disaggregated cluster, against one
engine with the same weights (fp32): penalties, min_tokens, stop_token_ids, n, logprobs
(including the first token's, sampled on the prefill worker) and prompt logprobs."""

from __future__ import annotations

import pytest
import torch

from tandem.client import Client
from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.llm import LLM
from tandem.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "Repeat after me: apple apple apple banana apple"


@pytest.fixture(scope="module")
def llm(loaded_fp32) -> LLM:
    return LLM.from_engine(LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1),
                                     loaded=loaded_fp32))


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=120) as c:
        yield c


def reference(llm: LLM, **params) -> list[int]:
    return llm.generate([PROMPT], SamplingParams(**params))[0].token_ids


def test_penalties_match_one_engine(client, llm):
    options = dict(max_tokens=12, temperature=0, repetition_penalty=1.3,
                   presence_penalty=0.5, frequency_penalty=0.4)
    out = client.generate(PROMPT, **options)
    assert out.token_ids == reference(llm, **options)
    assert out.token_ids != reference(llm, max_tokens=12, temperature=0)


def test_min_tokens_and_stop_token_ids_match_one_engine(client, llm):
    plain = reference(llm, max_tokens=8, temperature=0)
    stop = plain[3]
    out = client.generate(PROMPT, max_tokens=8, temperature=0, stop_token_ids=[stop])
    assert out.token_ids == plain[:4] and out.finish_reason == "stop"
    held = client.generate(PROMPT, max_tokens=8, temperature=0, stop_token_ids=[stop],
                           min_tokens=6)
    assert held.token_ids == reference(llm, max_tokens=8, temperature=0,
                                       stop_token_ids=[stop], min_tokens=6)
    assert len(held.token_ids) >= 6


def test_n_choices_use_seed_plus_index(client, llm):
    out = client.generate(PROMPT, max_tokens=8, temperature=1.0, seed=5, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for i, choice in enumerate(out.choices):
        assert choice.token_ids == reference(llm, max_tokens=8, temperature=1.0, seed=5 + i)
    assert out.usage.prompt_tokens == out.choices[2].usage.prompt_tokens


def test_logprobs_of_every_token_equal_the_engines_scores(client, llm):
    out = client.generate(PROMPT, max_tokens=5, temperature=0, logprobs=2, prompt_logprobs=1)
    ids = client.tokenize(PROMPT)
    scores = torch.log_softmax(llm.engine.score(ids + out.token_ids).float(), dim=-1)
    assert len(out.logprobs) == 5  # the first from the prefill worker, the rest from decode
    for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = scores[len(ids) - 1 + i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == row.topk(2).indices.tolist()
    assert len(out.prompt_logprobs) == len(ids) - 1
    for i, lp in enumerate(out.prompt_logprobs):
        assert lp.token_id == ids[i + 1]
        assert lp.logprob == pytest.approx(scores[i][ids[i + 1]].item(), abs=1e-4)


def test_streamed_choices_interleave_and_all_end(client):
    chunks = list(client.stream(PROMPT, max_tokens=6, temperature=0.7, seed=1, n=2,
                                ignore_eos=True))
    finals = [c for c in chunks if c.finish_reason]
    assert sorted(c.index for c in finals) == [0, 1]
    for i in (0, 1):
        assert sum(len(c.token_ids) for c in chunks if c.index == i) == 6
