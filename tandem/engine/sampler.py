"""Next-token choice: greedy, or temperature / top-k / top-p sampling with per-request seeds."""

from __future__ import annotations

import torch

from tandem.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """One token per row of float32 `logits` [N, vocab] for the matching `seqs`."""
    tokens = logits.argmax(dim=-1).tolist()
    rows = [i for i, s in enumerate(seqs) if not s.params.is_greedy]
    if not rows:
        return tokens
    probs = _filtered_probs(logits[rows], [seqs[i] for i in rows])
    for row, i in enumerate(rows):
        # Each seeded request draws from its own generator, so its output ignores batch mates.
        tokens[i] = int(torch.multinomial(probs[row], 1, generator=seqs[i].generator))
    return tokens


def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    temps = torch.tensor([s.params.temperature for s in seqs]).unsqueeze(1)
    logits = logits / temps
    top_k = [s.params.top_k for s in seqs]
    if any(top_k):
        k = torch.tensor([k or logits.shape[1] for k in top_k]).unsqueeze(1)
        kth = logits.sort(dim=1, descending=True).values.gather(1, k - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = torch.tensor([s.params.top_p for s in seqs]).unsqueeze(1)
    if (top_p < 1).any():
        sorted_logits, order = logits.sort(dim=1, descending=True)
        cumulative = sorted_logits.softmax(dim=1).cumsum(dim=1)
        # Drop a token once the mass before it already reaches top_p (the top token always stays).
        drop = (cumulative - sorted_logits.softmax(dim=1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    return logits.softmax(dim=1)
