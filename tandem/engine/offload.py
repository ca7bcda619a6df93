"""A decode step with attention offloaded (Lamina, DistAttention): the dense layers run here,
attention runs where each sequence's KV is.

Each offloaded sequence's KV sits on one or more holders (attention workers), by token range;
the last of them, the tail, takes its new tokens. Per layer, for the batch:
    pre_attn -> q goes to every holder, which returns out and lse over the keys it holds ->
    the new token's own term is one more partial, computed here (one key: out = v, lse = q.k) ->
    the new k/v go to each sequence's tail holder, after q (holders never count it twice) ->
    the exact merge (`partial_attention.merge_partials`) -> post_attn.
No KV block is held here for these sequences. A tail holder that runs out of room hands the
sequence's next tokens to another holder (`OffloadedSequence.spill_to`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from tandem.engine.errors import OutOfBlocksError
from tandem.engine.model import LlamaModel
from tandem.engine.partial_attention import merge_partials
from tandem.engine.rotary import Positions


class KVHolder(Protocol):
    """Where part of the KV of offloaded sequences lives (an attention worker, or its client)."""

    def open(self, seq_id: str, first_token: int) -> None:
        """Start holding `seq_id`'s tokens from position `first_token` on."""

    def extend(self, seq_ids: list[str]) -> None:
        """Room for one more token at the end of each sequence's range (OutOfBlocksError if
        there is none for one of them; then nothing is taken)."""

    def append(self, layer: int, seq_ids: list[str], keys: torch.Tensor,
               values: torch.Tensor) -> None:
        """That token's keys and values [B, Hkv, D] for one layer."""

    def attend(self, layer: int, seq_ids: list[str], q: torch.Tensor, scale: float) \
            -> tuple[torch.Tensor, torch.Tensor]:
        """out [B, Hq, D] and lse [B, Hq] (fp32) over the keys held; -inf where none."""

    def free(self, seq_id: str) -> None:
        """Stop holding `seq_id`; its blocks are free again."""


@dataclass
class OffloadedSequence:
    seq_id: str
    holders: list[KVHolder]  # by token range, in order; the last one is the tail
    spill_to: list[KVHolder] = field(default_factory=list)  # where it goes when the tail is full


@torch.inference_mode()
def offloaded_decode_step(model: LlamaModel, seqs: list[OffloadedSequence],
                          token_ids: list[int], positions: list[int]) -> torch.Tensor:
    """Run one decode step: the last token of each sequence at its position (whose KV is
    not held yet); fp32 logits [B, vocab]."""
    if not seqs:
        raise ValueError("an offloaded decode step needs at least one sequence")
    device = model.embed_tokens.weight.device
    ids = [s.seq_id for s in seqs]
    tails = _extend_tails(seqs, positions)
    holders = list({id(h): h for s in seqs for h in s.holders}.values())
    x = model.embed_tokens(torch.tensor(token_ids, device=device))
    at = Positions(torch.tensor(positions, device=device), model.rotary)
    for layer in model.layers:
        attn = layer.self_attn
        q, k, v, residual = layer.pre_attn(x, at)
        parts = [h.attend(attn.layer, ids, q, attn.scale) for h in holders]
        group = attn.num_heads // attn.num_kv_heads
        own_k = k.repeat_interleave(group, dim=1).float()
        own_lse = (q.float() * own_k).sum(dim=-1) * attn.scale  # one key: softmax weight 1
        own_out = v.repeat_interleave(group, dim=1).float()
        for tail, rows in tails:  # after every holder got q: none sees this token twice
            tail.append(attn.layer, [ids[r] for r in rows], k[rows], v[rows])
        out, _ = merge_partials(torch.stack([*(p[0] for p in parts), own_out]),
                                torch.stack([*(p[1] for p in parts), own_lse]))
        x = layer.post_attn(out.to(x.dtype), residual)
    return model.logits(x)


def _extend_tails(seqs: list[OffloadedSequence], positions: list[int]) \
        -> list[tuple[KVHolder, list[int]]]:
    """Room for this step's token on each sequence's tail holder; a full tail hands the
    sequence on to the first of its `spill_to` holders with room. The tails, with the batch
    rows each takes."""
    by_tail: dict[int, tuple[KVHolder, list[int]]] = {}
    for row, (seq, position) in enumerate(zip(seqs, positions, strict=True)):
        try:
            seq.holders[-1].extend([seq.seq_id])
        except OutOfBlocksError:
            _spill(seq, position)
        tail = seq.holders[-1]
        by_tail.setdefault(id(tail), (tail, []))[1].append(row)
    return list(by_tail.values())


def _spill(seq: OffloadedSequence, position: int) -> None:
    for holder in seq.spill_to:
        if any(holder is h for h in seq.holders):
            continue
        holder.open(seq.seq_id, position)
        try:
            holder.extend([seq.seq_id])
        except OutOfBlocksError:
            holder.free(seq.seq_id)
            continue
        seq.holders.append(holder)
        return
    raise OutOfBlocksError(f"sequence {seq.seq_id}: no attention worker has room for its next "
                           "token")
