"""Presence, frequency and repetition penalties, applied to the logits as vLLM applies them.

For every token seen in the prompt or the output, repetition penalty r turns a logit x into x / r
when x > 0 and into x * r otherwise; then frequency penalty f subtracts f * (the token's count in
the output) and presence penalty p subtracts p from every token the output holds.

The host lists, for the rows that ask for a penalty only, every (row, token, is-output) triple:
O(tokens of those rows), with no padding to the longest row. The device scatters them into a
[rows, vocab] seen-mask and output counts each step, so no per-request state lives between steps
and a request penalizes the same way after a handoff or a recomputation.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from tandem.engine.sequence import Sequence


@dataclass
class PenaltyInputs:
    """One step's penalties, for the rows whose penalties change their logits."""

    rows: torch.Tensor  # [P] int64: the batch rows penalized
    tokens: torch.Tensor  # [3, N] int64: slot in `rows`, token id, 1 if an output token else 0
    factors: torch.Tensor  # [P, 3] float32: presence, frequency, repetition


def prepare_penalties(seqs: Seq[Sequence], vocab_size: int,
                      upload: Callable[[torch.Tensor], torch.Tensor]) -> PenaltyInputs | None:
    """Host side: None when no row's penalties can change its logits (the common case costs a
    scan of the batch's parameters and nothing else)."""
    rows: list[int] = []
    factors: list[tuple[float, float, float]] = []
    slots: list[int] = []
    token_ids: list[int] = []
    is_output: list[int] = []
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.has_penalties:
            continue
        # The prompt matters to the repetition penalty alone: leave it out otherwise, so a
        # long prompt costs nothing to a request that only penalizes its own output.
        prompt = seq.token_ids[:seq.num_prompt_tokens] if p.repetition_penalty != 1 else []
        output = seq.output_token_ids
        if not prompt and not output:
            continue  # nothing seen yet (e.g. the first token, penalizing output only)
        slot = len(rows)
        rows.append(row)
        factors.append((float(p.presence_penalty), float(p.frequency_penalty),
                        float(p.repetition_penalty)))
        slots.extend([slot] * (len(prompt) + len(output)))
        token_ids.extend(prompt)
        token_ids.extend(output)
        is_output.extend([0] * len(prompt))
        is_output.extend([1] * len(output))
    if not rows:
        return None
    tokens = torch.tensor([slots, token_ids, is_output], dtype=torch.int64)
    tokens[1].clamp_(0, vocab_size - 1)  # ids were checked on entry; never index out of bounds
    return PenaltyInputs(rows=upload(torch.tensor(rows, dtype=torch.int64)),
                         tokens=upload(tokens),
                         factors=upload(torch.tensor(factors, dtype=torch.float32)))


def apply_penalties(logits: torch.Tensor, inputs: PenaltyInputs) -> torch.Tensor:
    """Device side, no host synchronisation: new float32 logits [B, V], the penalized rows
    changed and `logits` itself left as it was (its raw values give the logprobs)."""
    picked = logits.index_select(0, inputs.rows)  # [P, V], a copy
    slot, token, is_output = inputs.tokens.unbind(0)
    # A filled device scalar, not new_tensor(): that would be a synchronous upload. Duplicate
    # indices all write True, so this scatter needs no accumulation.
    seen = torch.zeros(picked.shape, dtype=torch.bool, device=picked.device).index_put_(
        (slot, token), torch.ones((), dtype=torch.bool, device=picked.device))
    # Counts in float32 are exact up to 2^24 occurrences, far past any context length, so the
    # order of the accumulation does not matter (the result is deterministic on CUDA too).
    counts = torch.zeros_like(picked).index_put_(
        (slot, token), is_output.to(picked.dtype), accumulate=True)
    presence, frequency, repetition = inputs.factors.unsqueeze(2).unbind(1)  # each [P, 1]
    # Unseen tokens get the factor 1, and x / 1 and x * 1 are exact: they stay untouched.
    scale = torch.where(seen, repetition, 1.0)
    picked = torch.where(picked > 0, picked / scale, picked * scale)
    picked = picked - frequency * counts - presence * (counts > 0).to(picked.dtype)
    return logits.index_copy(0, inputs.rows, picked)
