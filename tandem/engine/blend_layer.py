"""One decoder layer of a blend (`blend.blend`): the active positions' K/V written over the
reused ones, the selection (blend_select), then attention and the MLP for the kept tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.engine.blend_select import (
    BlendOptions,
    attention_probs,
    dependence,
    dependence_shares,
    kept_tokens,
    relative_deviation,
    select,
)
from tandem.engine.model import DecoderLayer, LlamaModel
from tandem.engine.rotary import Positions

ATTENTION_GROUPS = 4  # scattered queries attend in this many groups, each to the keys it needs


class LayerStep:
    """One decoder layer for the `active` positions (hidden states `x`): write their new K/V
    into the layer's `keys`/`values` [tokens, heads, dim], keep the chunk tokens the selection
    picks (blend_select), run attention and the MLP for those."""

    def __init__(self, model: LlamaModel, chunk_of: torch.Tensor, budgets: tuple[int, ...],
                 lengths: list[int], spans: list[tuple[int, int]], options: BlendOptions,
                 question_from: int | None, cap_tokens: int) -> None:
        self.model, self.chunk_of, self.lengths, self.spans = model, chunk_of, lengths, spans
        self.shares = [b / n if n else 0.0 for b, n in zip(budgets, lengths, strict=True)]
        self.options, self.question_from, self.cap_tokens = options, question_from, cap_tokens
        self.dependence: list[float] | None = None
        matched = options.matched or (0,) * len(spans)
        self.context_from = [spans[j - m][0] if m else start
                             for j, ((start, _), m) in enumerate(zip(spans, matched,
                                                                     strict=True))]

    def __call__(self, index: int, layer: DecoderLayer, x: torch.Tensor, active: torch.Tensor,
                 keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v, residual = layer.pre_attn(x, Positions(active, self.model.rotary))
        chunk_rows = bool((self.chunk_of >= 0).any())
        if index > 0 and chunk_rows:  # before the fresh K/V overwrite the reused ones
            deviation = relative_deviation(k, keys[active]) \
                + relative_deviation(v, values[active])
        keys[active], values[active] = k, v
        scale, options = layer.self_attn.scale, self.options
        if index == 1 and chunk_rows and (options.measure_dependence
                                          or options.dependence_budgets):
            self.dependence = dependence(q, keys, active, self.spans, scale, self.context_from)
            if options.dependence_budgets:
                relevance = self._relevance(q, keys, active, scale) \
                    if options.question_budgets else None
                self.shares = dependence_shares(self.dependence, self.lengths, self.cap_tokens,
                                                options.dependence_scale, relevance)
        wants = [kept_tokens(index, len(self.model.layers), share, n, options.gradual)
                 for share, n in zip(self.shares, self.lengths, strict=True)]
        have = torch.bincount(self.chunk_of[self.chunk_of >= 0],
                              minlength=len(wants)).tolist()
        if any(w < h for w, h in zip(wants, have, strict=False)):
            question = self._question_score(q, keys, active, scale)
            keep = select(deviation, self.chunk_of, wants, question, options.question_share)
            active, residual, q = active[keep], residual[keep], q[keep]
            self.chunk_of = self.chunk_of[keep]
        out = attend(q, keys, values, active, scale)
        return active, layer.post_attn(out, residual)

    def _relevance(self, q: torch.Tensor, keys: torch.Tensor, active: torch.Tensor,
                   scale: float) -> list[float] | None:
        """Per chunk, the attention mass the question's tokens pay it."""
        score = self._question_score(q, keys, active, scale, every_key=True)
        if score is None:
            return None
        return [float(score[start:end].sum()) for start, end in self.spans]

    def _question_score(self, q: torch.Tensor, keys: torch.Tensor, active: torch.Tensor,
                        scale: float, every_key: bool = False) -> torch.Tensor | None:
        """Per active row (or per key position), the attention the question's tokens pay it
        at this layer."""
        if self.question_from is None:
            return None
        rows = active >= self.question_from
        probs = attention_probs(q[rows], keys[:int(active[-1]) + 1], active[rows], scale)
        return probs.sum(0) if every_key else probs.sum(0)[active]


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
            scale: float) -> torch.Tensor:
    """Queries q [m, heads, dim] at ascending `positions` attend to every key up to their own."""
    m, first, end = len(positions), int(positions[0]), int(positions[-1]) + 1
    if end - first == m and first <= m:  # one run: causal, queries padded to start at 0
        q = torch.cat((q.new_zeros(first, *q.shape[1:]), q))
        return _sdpa(q, keys[:end], values[:end], None, scale)[-m:]
    # Scattered queries: in groups by position, each group reads keys only up to its last.
    parts = []
    for rows in torch.arange(m, device=q.device).tensor_split(min(ATTENTION_GROUPS, m)):
        group = positions[rows]
        stop = int(group[-1]) + 1
        mask = torch.arange(stop, device=q.device).unsqueeze(0) <= group.unsqueeze(1)
        parts.append(_sdpa(q[rows], keys[:stop], values[:stop], mask, scale))
    return torch.cat(parts)


def _sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
          scale: float) -> torch.Tensor:
    # 4-D [1, H, T, D] inputs: torch's CPU flash kernel ignores 3-D ones.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
        attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)
