"""Which chunk tokens a blend recomputes, layer by layer, and how much each chunk depends on
what precedes it.

- Budgets: each chunk keeps `budget_j` tokens through the deepest layers (`BlendOptions.budgets`;
  by default `recompute_ratio` of every chunk's tokens). Gradual filtering keeps
  `GRADUAL_START` x that share at layer 1 and shrinks to it at the middle layer.
- Within a chunk, the tokens whose fresh K/V moved most from the reused ones stay (HKVD:
  |new - old|^2 / |new|^2 for K plus the same for V). Question-aware selection gives
  `question_share` of each chunk's keep to the tokens the question's queries attend to most.
- Dependence: at layer 1 every token is computed from exact inputs (layer 0's K/V depend only on
  token and position), so its attention is full prefill's. The share of a chunk's attention
  that goes to earlier tokens (past the sequence's first, the attention sink) is how much its
  KV depends on what precedes it: near 0 a chunk reads the same wherever it lands.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRADUAL_START = 3.0  # x a chunk's share: kept at layer 1, shrunk to the share
SHRINK_UNTIL = 0.5  # ... at this fraction of the layers
DEPENDENCE_QUERIES = 32  # chunk tokens sampled per chunk to measure its dependence
SINK_POSITIONS = 1  # the sequence's first token: the attention sink, not context


@dataclass(frozen=True)
class BlendOptions:
    """How a blend picks the tokens it recomputes (defaults: CacheBlend as published)."""

    budgets: tuple[int, ...] | None = None  # per chunk, tokens kept to the deepest layers
    gradual: bool = True  # False: one selection at layer 1, kept through every layer
    sink_tokens: int = 0  # each chunk's first tokens: always recomputed
    question_aware: bool = False  # with the question's tokens as the blend's tail
    question_share: float = 0.5  # of each chunk's keep, picked by the question's attention
    rope_fp32: bool = True  # the keys' position shift in float32 (False: in the KV dtype)
    measure_dependence: bool = False
    # Cache-Craft: budgets from each chunk's dependence measured at layer 1 (`dependence_scale`
    # x its dependence x its tokens), their total capped at recompute_ratio of the chunk tokens.
    dependence_budgets: bool = False
    dependence_scale: float = 1.0
    # Per chunk, how many of its nearest preceding chunks its KV was computed behind (a
    # matched variant): attention to them is already right, so it is no dependence.
    matched: tuple[int, ...] | None = None
    # With the question in the blend (question_aware): weigh each chunk's budget by the
    # attention the question pays it at layer 1, relative to the chunks' mean.
    question_budgets: bool = False
    # A prompt none of whose chunks is cached is prefilled in full (exact), and its chunks'
    # KV kept as variants (BlendPlanner; blend() itself ignores it).
    capture_cold: bool = False


def kept_tokens(layer: int, num_layers: int, share: float, n: int, gradual: bool = True) -> int:
    """How many of a chunk's `n` tokens stay selected at `layer` for a final `share`: all at
    layer 0, then (gradually) GRADUAL_START x share, shrinking to share at the middle layer."""
    if share == 0 or n == 0:
        return 0
    if layer == 0:
        return n
    if not gradual:
        return max(1, min(n, round(share * n)))
    last = max(2, int(num_layers * SHRINK_UNTIL))
    start = min(1.0, GRADUAL_START * share)
    t = min(1.0, (layer - 1) / (last - 1))
    return max(1, min(n, round((start + (share - start) * t) * n)))


def relative_deviation(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """|new - old|^2 / |new|^2 per token: scale-free, so neither keys nor values (nor a few
    large-norm tokens) drown out the rest."""
    new = new.float().flatten(1)
    return (new - old.float().flatten(1)).pow(2).sum(1) / new.pow(2).sum(1).clamp_min(1e-12)


def attention_probs(q: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Causal attention weights [m, T] of queries q [m, heads, dim] at `positions` over
    keys [T, kv_heads, dim], averaged over heads (float32)."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    k = keys.float().repeat_interleave(heads // kv_heads, dim=1)  # [T, heads, dim]
    scores = torch.einsum("mhd,thd->hmt", q.float(), k) * scale
    visible = torch.arange(keys.shape[0], device=q.device)[None, :] <= positions[:, None]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return scores.softmax(-1).mean(0)


def dependence(q: torch.Tensor, keys: torch.Tensor, active: torch.Tensor,
               spans: list[tuple[int, int]], scale: float,
               context_from: list[int] | None = None) -> list[float]:
    """Per chunk span [start, end) (positions), the mean attention mass its sampled tokens put
    on earlier tokens past the sink (and before `context_from[j]`, where its matched context
    begins); `q` holds the queries of the `active` positions."""
    out = []
    for j, (start, end) in enumerate(spans):
        cut = start if context_from is None else context_from[j]
        rows = torch.nonzero((active >= start) & (active < end)).flatten()
        if len(rows) == 0:
            out.append(0.0)
            continue
        rows = rows[torch.linspace(0, len(rows) - 1, min(DEPENDENCE_QUERIES, len(rows)),
                                   device=rows.device).long()]
        probs = attention_probs(q[rows], keys[:end], active[rows], scale)
        out.append(float(probs[:, SINK_POSITIONS:cut].sum(1).mean()))
    return out


def dependence_shares(dependences: list[float], lengths: list[int], cap_tokens: int,
                      scale: float, relevance: list[float] | None = None) -> list[float]:
    """Per chunk, the share of its tokens to recompute: `scale` x its dependence (x its
    `relevance`: the question's attention to it over the chunks' mean), all of them scaled
    down together so that the total stays within `cap_tokens`."""
    if relevance is not None:
        mean = sum(relevance) / max(1, len(relevance))
        weights = [r / mean if mean > 0 else 1.0 for r in relevance]
    else:
        weights = [1.0] * len(dependences)
    wants = [min(1.0, scale * max(0.0, d) * w) for d, w in zip(dependences, weights,
                                                                strict=True)]
    total = sum(w * n for w, n in zip(wants, lengths, strict=True))
    if total > cap_tokens > 0:
        wants = [w * cap_tokens / total for w in wants]
    elif cap_tokens <= 0:
        wants = [0.0] * len(wants)
    return wants


def select(deviation: torch.Tensor, chunk_of: torch.Tensor, wants: list[int],
           question_score: torch.Tensor | None, question_share: float) -> torch.Tensor:
    """Indices (ascending) of the rows to keep: every row whose chunk is -1 (always computed),
    and per chunk j the `wants[j]` rows of chunk j that deviate most (with a question score:
    `question_share` of them those the question attends to most)."""
    keep = [torch.nonzero(chunk_of < 0).flatten()]
    for j, want in enumerate(wants):
        rows = torch.nonzero(chunk_of == j).flatten()
        if want >= len(rows):
            keep.append(rows)
            continue
        if want <= 0:
            continue
        chosen = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        by_question = 0 if question_score is None else round(question_share * want)
        if by_question:
            chosen[torch.topk(question_score[rows], by_question).indices] = True
        score = deviation[rows].masked_fill(chosen, float("-inf"))
        chosen[torch.topk(score, want - by_question).indices] = True
        keep.append(rows[chosen])
    return torch.cat(keep).sort().values


CACHEBLEND = BlendOptions()  # CacheBlend as published: one HKVD competition, ratio x tokens
DEFAULT_POLICY = BlendOptions(dependence_budgets=True, capture_cold=True, question_aware=True)
"""Cache-Craft, what `BlendPlanner.plan` does unless told otherwise: per-chunk budgets from
the measured dependence (capped by the prompt's recompute_ratio), variants where they match,
question-aware selection, and a prompt none of whose chunks is cached prefilled in full, its
variants kept. (On the hard set, question-aware selection and variants lowered the KL most;
the first tokens, a neutral prefix and the RoPE dtype did not matter: README.)"""
