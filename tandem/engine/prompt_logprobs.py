"""Prompt logprobs: how likely the model found each prompt token given the tokens before it.

One teacher-forced pass (`LLMEngine.score`) gives the logits at every prompt position; position
i predicts token i + 1, so a T-token prompt yields T - 1 entries (the first token has no context
and gets none, as in vLLM, where it is the None at the head of the list).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tandem.engine.sampler import TokenLogprobs
from tandem.engine.sampling_params import MAX_LOGPROBS

if TYPE_CHECKING:
    from tandem.engine.engine import LLMEngine

_ROWS_PER_PASS = 256  # log-softmax this many positions at a time: a bounded [rows, vocab] copy


def prompt_logprobs(engine: LLMEngine, token_ids: list[int], top_n: int) \
        -> list[TokenLogprobs]:
    """For prompt tokens 1..T-1, the raw float32 log-softmax logprob of the token given the
    ones before it, and the `top_n` most likely (token id, logprob) there, most likely first."""
    if not isinstance(top_n, int) or isinstance(top_n, bool) or not 0 <= top_n <= MAX_LOGPROBS:
        raise ValueError(f"top_n={top_n!r} must be an integer in [0, {MAX_LOGPROBS}]")
    if not token_ids:
        raise ValueError("token_ids: is empty; prompt logprobs need at least one token")
    vocab = engine.model_config.vocab_size
    bad = next((t for t in token_ids if not isinstance(t, int) or isinstance(t, bool)
                or not 0 <= t < vocab), None)
    if bad is not None:  # score() checks too, but a 1-token prompt never reaches it
        raise ValueError(f"token_ids: token id {bad!r} is outside the vocabulary [0, {vocab})")
    if len(token_ids) == 1:
        return []
    # Float32 on the host whatever the engine's dtype; the last position predicts past the
    # prompt, so it is not needed.
    logits = engine.score(list(token_ids))[:-1]
    targets = torch.tensor(token_ids[1:], dtype=torch.int64)
    out: list[TokenLogprobs] = []
    for start in range(0, logits.shape[0], _ROWS_PER_PASS):
        logprobs = logits[start:start + _ROWS_PER_PASS].float().log_softmax(dim=1)
        chosen = logprobs.gather(1, targets[start:start + _ROWS_PER_PASS].unsqueeze(1))
        if top_n:
            top = logprobs.topk(top_n, dim=1)
            ids, values = top.indices.tolist(), top.values.tolist()
        else:
            ids = values = [[] for _ in range(logprobs.shape[0])]
        for value, row_ids, row_values in zip(chosen.squeeze(1).tolist(), ids, values,
                                              strict=True):
            out.append(TokenLogprobs(value, list(zip(row_ids, row_values, strict=True))))
    return out
