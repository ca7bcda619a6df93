"""`SamplingParams.after`: the settings for the rest of a request resumed after n tokens (their
ids appended to its prompt) continue it exactly, draws included (fp32, one engine)."""

from __future__ import annotations

import pytest

from tandem.engine.llm import LLM
from tandem.engine.sampling_params import SamplingParams

PROMPT = [504, 3545, 282, 4649, 314, 260, 1345, 282]


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=4, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.9, seed=4, min_tokens=8),
], ids=["greedy", "seeded", "min-tokens"])
def test_a_resumed_request_continues_exactly(make_engine, params):
    full = LLM.from_engine(make_engine()).generate([PROMPT], params)[0].token_ids
    k = 5
    rest = LLM.from_engine(make_engine()).generate([PROMPT + full[:k]],
                                                   params.after(k))[0].token_ids
    assert full[:k] + rest == full


def test_after_counts_down_the_limits():
    p = SamplingParams(max_tokens=10, min_tokens=4, seed=1).after(6)
    assert (p.max_tokens, p.min_tokens, p.draw_offset) == (4, 0, 6)
    assert p.after(2).draw_offset == 8
    with pytest.raises(ValueError, match="draw_offset"):
        SamplingParams(draw_offset=-1)
