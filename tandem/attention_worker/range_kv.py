"""`RangeKV`: the KV one attention worker holds, in paged blocks of its own pool.

For each sequence it holds one contiguous token range, [first_token, first_token + n): the
whole sequence, or the part of it placed here (the rest is on other holders). The range grows
at its end as tokens are appended, and `attend` returns, per query head, the attention output
and its log-sum-exp over exactly the keys held here, so the partial results of every holder
merge exactly (`engine.partial_attention.merge_partials`). A sequence held nowhere here gets
out 0 and lse -inf: a holder may be asked about a whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tandem.attention_worker.block_pool import BlockPool, runs_of
from tandem.engine.errors import OutOfBlocksError
from tandem.engine.kv_cache import KVCache, KVSpec
from tandem.engine.partial_attention import (
    attend_run_with_lse,
    merge_partials,
    paged_attend_with_lse,
)


@dataclass
class HeldRange:
    first_token: int  # the position, in its sequence, of the first token held here
    num_tokens: int = 0
    blocks: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Answered:
    out_lse: tuple[torch.Tensor, torch.Tensor]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.out_lse


class RangeKV:
    def __init__(self, spec: KVSpec, num_blocks: int, device: torch.device | str = "cpu") \
            -> None:
        self.spec = spec
        self.cache = KVCache(spec, num_blocks, torch.device(device))
        self._pool = BlockPool(num_blocks)
        self.ranges: dict[str, HeldRange] = {}
        self._step_slots: dict[str, torch.Tensor] = {}  # this decode step's slot per sequence
        # Block tables and lengths per batch attended: every layer of a step asks for the same
        # (one per micro-batch), so they are built once; any change to what is held clears them.
        self._tables: dict[tuple[str, ...], Any] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._pool)

    @property
    def held_bytes(self) -> int:
        """KV bytes of the tokens held (not counting the unused tail of each last block)."""
        return sum(r.num_tokens for r in self.ranges.values()) * self.spec.bytes_per_token

    def open(self, seq_id: str, first_token: int) -> None:
        """Start holding `seq_id`'s tokens from position `first_token` on."""
        if seq_id in self.ranges:
            raise ValueError(f"sequence {seq_id!r} is already held here")
        if first_token < 0:
            raise ValueError(f"first_token: {first_token} is negative")
        self.ranges[seq_id] = HeldRange(first_token)
        self._tables.clear()

    def grow(self, seq_id: str, num_tokens: int) -> torch.Tensor:
        """Room for `num_tokens` more tokens at the end of the range; their flat slots (block *
        block_size + offset), in order. Raises OutOfBlocksError (taking nothing) when the pool
        is short."""
        slots = self._room(seq_id, num_tokens)
        self.ranges[seq_id].num_tokens += num_tokens
        self._tables.clear()
        return slots

    def _room(self, seq_id: str, num_tokens: int) -> torch.Tensor:
        """Blocks for `num_tokens` more tokens (not counted as held yet); their slots."""
        held = self._held(seq_id)
        bs = self.spec.block_size
        needed = self.spec.num_blocks_for(held.num_tokens + num_tokens) - len(held.blocks)
        if needed > len(self._pool):
            raise OutOfBlocksError(f"sequence {seq_id}: {needed} more KV blocks needed, "
                                   f"{len(self._pool)} free on this attention worker")
        if needed > 0:
            held.blocks.extend(self._pool.take(needed, held.blocks[-1] if held.blocks else None))
        self._tables.clear()
        offsets = torch.arange(held.num_tokens, held.num_tokens + num_tokens)
        table = torch.tensor(held.blocks, dtype=torch.long)
        return table[offsets // bs] * bs + offsets % bs

    def reserve_room(self, seq_id: str, num_tokens: int) -> None:
        """Blocks for `num_tokens` more tokens past the range's end, taken now (so they count
        as used) but filled only as the sequence grows: room promised to a request's decode.
        OutOfBlocksError takes nothing."""
        self._room(seq_id, num_tokens)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Store one layer's keys and values [n, kv_heads, head_dim] at `slots` (from `grow`)."""
        self.cache.write(layer, slots.to(self.cache.data.device), keys, values)

    def extend(self, seq_ids: list[str]) -> None:
        """Room for one more token at the end of each sequence (a decode step); its k/v come
        layer by layer through `append`, and it counts as held (`attend` reads it) once the
        last layer's came. OutOfBlocksError takes nothing."""
        needed = sum(max(0, self.spec.num_blocks_for(self._held(s).num_tokens + 1)
                         - len(self._held(s).blocks)) for s in seq_ids)
        if needed > len(self._pool):
            raise OutOfBlocksError(f"{needed} more KV blocks needed for a step, "
                                   f"{len(self._pool)} free on this attention worker")
        self._step_slots.update({s: self._room(s, 1) for s in seq_ids})

    def append(self, layer: int, seq_ids: list[str], keys: torch.Tensor,
               values: torch.Tensor) -> None:
        """The k/v [B, Hkv, D] of the token `extend` made room for, for one layer."""
        slots = torch.cat([self._step_slots[s] for s in seq_ids])
        self.write(layer, slots, keys, values)
        if layer == self.spec.num_layers - 1:  # every layer has it now
            for seq_id in seq_ids:
                self.ranges[seq_id].num_tokens += 1
                del self._step_slots[seq_id]
            self._tables.clear()

    def attend(self, layer: int, seq_ids: list[str], q: torch.Tensor, scale: float) \
            -> tuple[torch.Tensor, torch.Tensor]:
        """Decode attention of q [B, Hq, D] (one query per sequence) over the keys held here;
        out [B, Hq, D] and lse [B, Hq], fp32. CUDA: the paged kernel over the batch; CPU: per
        sequence, each contiguous run of its blocks read in place (no gather), runs merged."""
        k_pool, v_pool = self.cache.layer(layer)  # [blocks, block_size, Hkv, D]
        q = q.to(self.cache.data.device)
        if q.device.type == "cuda":
            tables, lengths = self._batch_tables(seq_ids)
            return paged_attend_with_lse(q, k_pool, v_pool, tables, lengths, scale)
        out = torch.zeros(q.shape, dtype=torch.float32)
        lse = torch.full(q.shape[:2], float("-inf"))
        for row, runs in enumerate(self._batch_runs(seq_ids)):
            parts = [attend_run_with_lse(q[row], *(pool[first:last].flatten(0, 1)[:n]
                                                    for pool in (k_pool, v_pool)), scale)
                     for first, last, n in runs]
            if len(parts) == 1:
                out[row], lse[row] = parts[0]
            elif parts:
                merged = merge_partials(torch.stack([p[0] for p in parts]).unsqueeze(1),
                                        torch.stack([p[1] for p in parts]).unsqueeze(1))
                out[row], lse[row] = merged[0][0], merged[1][0]
        return out, lse

    def _batch_runs(self, seq_ids: list[str]) -> list[list[tuple[int, int, int]]]:
        """Per sequence, its contiguous runs as (first block, end block, tokens)."""
        key = ("runs", *seq_ids)
        if key not in self._tables:
            bs = self.spec.block_size
            self._tables[key] = [
                [(first, first + -(-n // bs), n) for first, n in
                 runs_of(self.ranges[s].blocks, self.ranges[s].num_tokens, bs)]
                if s in self.ranges else [] for s in seq_ids]
        return self._tables[key]

    def _batch_tables(self, seq_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(seq_ids)
        if key in self._tables:
            return self._tables[key]
        lengths = [self.ranges[s].num_tokens if s in self.ranges else 0 for s in seq_ids]
        width = max([len(self.ranges[s].blocks) for s in seq_ids if s in self.ranges] or [1])
        # Sequences with fewer blocks read block 0 as padding; `lengths` masks it out.
        tables = torch.zeros(len(seq_ids), width, dtype=torch.long)
        for row, seq_id in enumerate(seq_ids):
            blocks = self.ranges[seq_id].blocks if seq_id in self.ranges else []
            tables[row, :len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        device = self.cache.data.device
        built = self._tables[key] = (tables.to(device), torch.tensor(lengths, device=device))
        return built

    def request_attend(self, layer: int, seq_ids: list[str], q: torch.Tensor,
                       scale: float) -> Answered:
        """`attend`, as a `KVHolder` answers: here at once."""
        return Answered(self.attend(layer, seq_ids, q, scale))

    def free(self, seq_id: str) -> None:
        self._step_slots.pop(seq_id, None)  # a step cut short (another holder failed)
        held = self.ranges.pop(seq_id, None)
        self._tables.clear()
        if held is not None:
            self._pool.give(held.blocks)

    def _held(self, seq_id: str) -> HeldRange:
        held = self.ranges.get(seq_id)
        if held is None:
            raise KeyError(f"sequence {seq_id!r} is not held here")
        return held
