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

With `micro_batches=2` the batch runs as Lamina's staggered pipeline: while one half's
attention runs on the holders, the other half's dense layers run here. A holder that fails or
misses its deadline (`KVHolderLost`) costs only the sequences whose KV it holds: the step
reports them as lost and the others go on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from tandem.engine.errors import KVHolderLost, OutOfBlocksError
from tandem.engine.model import LlamaModel
from tandem.engine.partial_attention import merge_partials
from tandem.engine.rotary import Positions


class AttendReply(Protocol):
    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """out [B, Hq, D] and lse [B, Hq] (fp32) over the keys held; -inf where none."""


T = TypeVar("T")
KV_LOST = "kv_lost"  # the finish reason of a sequence whose offloaded KV is gone


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

    def request_attend(self, layer: int, seq_ids: list[str], q: torch.Tensor, scale: float) \
            -> AttendReply:
        """Ask for attention of q [B, Hq, D] over the keys held; the answer may come later."""

    def free(self, seq_id: str) -> None:
        """Stop holding `seq_id`; its blocks are free again."""


@dataclass
class OffloadedSequence:
    seq_id: str
    holders: list[KVHolder]  # by token range, in order; the last one is the tail
    spill_to: list[KVHolder] = field(default_factory=list)  # where it goes when the tail is full
    lost: str | None = None  # why its KV is gone, once a step lost it (it finishes "kv_lost")

    def release(self) -> None:
        """Free its KV on every holder (best effort: a lost holder holds nothing anyway)."""
        for holder in self.holders:
            with contextlib.suppress(KVHolderLost):
                holder.free(self.seq_id)


@dataclass
class OffloadedStep:
    logits: torch.Tensor  # fp32 [B, vocab]; rows in `lost` are meaningless
    lost: dict[int, str]  # batch row -> why its KV is gone (a holder failed, or no room)
    wait_s: float = 0.0  # time spent waiting for holders' answers (not hidden by compute)
    step_s: float = 0.0  # the whole step


@dataclass
class OffloadTotals:
    """Offloaded decode steps so far, on one engine."""

    steps: int = 0
    rows: int = 0  # sequence-steps
    wait_s: float = 0.0
    step_s: float = 0.0

    def add(self, step: OffloadedStep, rows: int) -> None:
        self.steps += 1
        self.rows += rows
        self.wait_s += step.wait_s
        self.step_s += step.step_s


@torch.inference_mode()
def offloaded_decode_step(model: LlamaModel, seqs: list[OffloadedSequence],
                          token_ids: list[int], positions: list[int],
                          micro_batches: int = 1) -> OffloadedStep:
    """Run one decode step: the last token of each sequence at its position (whose KV is not
    held yet). `micro_batches` 2 runs the ping-pong pipeline."""
    if not seqs:
        raise ValueError("an offloaded decode step needs at least one sequence")
    started = time.perf_counter()
    waited = [0.0]
    lost: dict[int, str] = {}
    tails = _extend_tails(seqs, positions, lost)
    failed: dict[int, str] = {}  # id(holder) -> why, for holders that failed this step
    n = len(seqs)
    halves = [list(range(n))] if micro_batches < 2 or n < 2 else \
        [list(range(0, n, 2)), list(range(1, n, 2))]
    runs = [_run_rows(model, seqs, rows, token_ids, positions, tails, failed, lost, waited)
            for rows in halves]
    logits: list[torch.Tensor | None] = [None] * len(runs)
    while any(x is None for x in logits):  # round robin: each yields once its q is out
        for i, run in enumerate(runs):
            if logits[i] is None:
                try:
                    next(run)
                except StopIteration as done:
                    logits[i] = done.value
    out = torch.empty(n, logits[0].shape[-1], dtype=logits[0].dtype, device=logits[0].device)
    for rows, part in zip(halves, logits, strict=True):
        out[rows] = part
    for row, seq in enumerate(seqs):
        why = next((failed[id(h)] for h in seq.holders if id(h) in failed), None)
        if why is not None:
            lost.setdefault(row, why)
    return OffloadedStep(out, lost, waited[0], time.perf_counter() - started)


def _run_rows(model: LlamaModel, seqs: list[OffloadedSequence], rows: list[int],
              token_ids: list[int], positions: list[int],
              tails: dict[int, tuple[KVHolder, list[int]]], failed: dict[int, str],
              lost: dict[int, str], waited: list[float]) -> Generator[None, None, torch.Tensor]:
    """One micro-batch's forward; it yields after each layer's q (and new k/v) left."""
    device = model.embed_tokens.weight.device
    ids = [seqs[r].seq_id for r in rows]
    holders = list({id(h): h for r in rows for h in seqs[r].holders}.values())
    # This micro-batch's rows per tail holder (indices into `rows`), skipping lost rows.
    local = {r: i for i, r in enumerate(rows)}
    my_tails = [(tail, [local[r] for r in tail_rows if r in local and r not in lost])
                for tail, tail_rows in tails.values()]
    x = model.embed_tokens(torch.tensor([token_ids[r] for r in rows], device=device))
    at = Positions(torch.tensor([positions[r] for r in rows], device=device), model.rotary)
    for layer in model.layers:
        attn = layer.self_attn
        q, k, v, residual = layer.pre_attn(x, at)
        asked = [(h, _ask(h, attn.layer, ids, q, attn.scale, failed)) for h in holders]
        for tail, tail_rows in my_tails:  # after every holder got q: none sees it twice
            if tail_rows and id(tail) not in failed:
                _guard(tail, failed, tail.append, attn.layer, [ids[i] for i in tail_rows],
                       k[tail_rows], v[tail_rows])
        yield  # the other micro-batch's dense layers run while these attend
        group = attn.num_heads // attn.num_kv_heads
        outs = [v.repeat_interleave(group, dim=1).float()]  # the new token's own term:
        own_k = k.repeat_interleave(group, dim=1).float()  # one key, softmax weight 1
        lses = [(q.float() * own_k).sum(dim=-1) * attn.scale]
        wait_from = time.perf_counter()
        for holder, reply in asked:
            part = _guard(holder, failed, reply.result) if reply is not None else None
            if part is not None:
                outs.append(part[0].to(q.device))
                lses.append(part[1].to(q.device))
        waited[0] += time.perf_counter() - wait_from
        out, _ = merge_partials(torch.stack(outs), torch.stack(lses))
        x = layer.post_attn(out.to(x.dtype), residual)
    return model.logits(x)


def _ask(holder: KVHolder, layer: int, ids: list[str], q: torch.Tensor, scale: float,
         failed: dict[int, str]) -> AttendReply | None:
    if id(holder) in failed:
        return None
    return _guard(holder, failed, holder.request_attend, layer, ids, q, scale)


def _guard(holder: KVHolder, failed: dict[int, str], call: Callable[..., T], *args: Any) \
        -> T | None:
    """`call(*args)`, or None when the holder fails (it is then out for the rest of the
    step)."""
    try:
        return call(*args)
    except KVHolderLost as e:
        failed.setdefault(id(holder), str(e))
        return None


def _extend_tails(seqs: list[OffloadedSequence], positions: list[int],
                  lost: dict[int, str]) -> dict[int, tuple[KVHolder, list[int]]]:
    """Room for this step's token on each sequence's tail holder; a full tail hands the
    sequence on to the first of its `spill_to` holders with room. The tails, with the batch
    rows each takes; a row whose tail failed, or found no room anywhere, goes to `lost`."""
    by_tail: dict[int, tuple[KVHolder, list[int]]] = {}
    for row, (seq, position) in enumerate(zip(seqs, positions, strict=True)):
        try:
            try:
                seq.holders[-1].extend([seq.seq_id])
            except OutOfBlocksError:
                _spill(seq, position)
        except (KVHolderLost, OutOfBlocksError) as e:
            lost[row] = str(e)
            continue
        tail = seq.holders[-1]
        by_tail.setdefault(id(tail), (tail, []))[1].append(row)
    return by_tail


def _spill(seq: OffloadedSequence, position: int) -> None:
    for holder in seq.spill_to:
        if any(holder is h for h in seq.holders):
            continue
        try:
            holder.open(seq.seq_id, position)
            try:
                holder.extend([seq.seq_id])
            except OutOfBlocksError:
                holder.free(seq.seq_id)
                continue
        except KVHolderLost:
            continue
        seq.holders.append(holder)
        return
    raise OutOfBlocksError(f"sequence {seq.seq_id}: no attention worker has room for its next "
                           "token")
