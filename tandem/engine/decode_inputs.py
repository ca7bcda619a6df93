"""The decode path's inputs: block tables that live on the device, and one upload per step.

Each decoding sequence owns a row of `block_tables` for as long as it runs. A step uploads, in
one copy, the token id, position, slot and row of each sequence plus the table entries that
changed since the last step (a new block every `block_size` tokens), so the host's work is
O(batch), not O(context) or O(layers). Rows are taken back lazily: when none is free, rows of
sequences no longer running are reclaimed. A sequence whose table was emptied (a preemption)
is synced again from its first block (`Sequence.block_table_epoch`).

Steps may be padded to a CUDA-graph bucket: padding rows decode token 0 at position 0 from the
padding row, whose table points only at the cache's scratch block, and write their K/V there,
so they never touch a block a request owns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.engine.batch_inputs import upload
from tandem.engine.sequence import Sequence, SequenceStatus

NUM_FIELDS = 4  # token id, position, slot, row


@dataclass
class DecodeStep:
    size: int  # sequences
    packed: torch.Tensor  # [NUM_FIELDS, padded] int64 on the device
    max_context_len: int  # of the real sequences

    @property
    def padded(self) -> int:
        return self.packed.shape[1]

    @property
    def input_ids(self) -> torch.Tensor:
        return self.packed[0]

    @property
    def positions(self) -> torch.Tensor:
        return self.packed[1]

    @property
    def slot_mapping(self) -> torch.Tensor:
        return self.packed[2]

    @property
    def seq_rows(self) -> torch.Tensor:
        return self.packed[3]


class DecodeInputs:
    def __init__(self, max_rows: int, max_blocks_per_seq: int, block_size: int,
                 scratch_block: int, device: torch.device) -> None:
        self.block_size = block_size
        self.padding_row = max_rows
        self.scratch_slot = scratch_block * block_size
        self.block_tables = torch.full((max_rows + 1, max_blocks_per_seq), scratch_block,
                                       dtype=torch.int32, device=device)
        self.device = device
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self._rows: dict[Sequence, int] = {}
        self._synced: dict[Sequence, tuple[int, int]] = {}  # seq -> (table epoch, blocks synced)
        self.num_table_entries_uploaded = 0  # for stats and tests: O(new blocks), not O(context)

    def prepare(self, seqs: list[Sequence], padded: int) -> DecodeStep:
        """Inputs for one decode token of each of `seqs` (each has exactly one to compute),
        padded to `padded` rows."""
        bs = self.block_size
        fields: list[list[int]] = [[], [], [], []]
        changed_rows: list[int] = []
        changed_cols: list[int] = []
        changed_ids: list[int] = []
        for seq in seqs:
            row = self._row_of(seq)
            table = seq.block_table
            epoch, synced = self._synced.get(seq, (-1, 0))
            if epoch != seq.block_table_epoch:
                synced = 0
            if len(table) > synced:
                changed_rows.extend([row] * (len(table) - synced))
                changed_cols.extend(range(synced, len(table)))
                changed_ids.extend(table[synced:])
                self._synced[seq] = (seq.block_table_epoch, len(table))
            pos = seq.num_computed_tokens
            fields[0].append(seq.token_ids[pos])
            fields[1].append(pos)
            fields[2].append(table[pos // bs] * bs + pos % bs)
            fields[3].append(row)
        pad = padded - len(seqs)
        for values, filler in zip(fields, (0, 0, self.scratch_slot, self.padding_row),
                                  strict=True):
            values.extend([filler] * pad)
        flat = [v for values in fields for v in values]
        data = upload(flat + changed_rows + changed_cols + changed_ids, self.device)
        n = len(changed_rows)
        self.num_table_entries_uploaded += n
        if n:
            base = NUM_FIELDS * padded
            self.block_tables[data[base:base + n], data[base + n:base + 2 * n]] = \
                data[base + 2 * n:].to(torch.int32)
        return DecodeStep(len(seqs), data[:NUM_FIELDS * padded].view(NUM_FIELDS, padded),
                          max(fields[1][:len(seqs)], default=0) + 1)

    def _row_of(self, seq: Sequence) -> int:
        row = self._rows.get(seq)
        if row is not None:
            return row
        if not self._free_rows:
            self._reclaim()
        row = self._rows[seq] = self._free_rows.pop()
        self._synced.pop(seq, None)
        return row

    def _reclaim(self) -> None:
        """Take back the rows of sequences that stopped running (finished, aborted or
        preempted); a preempted one gets a row again when it decodes again."""
        for seq in [s for s in self._rows if s.status != SequenceStatus.RUNNING]:
            self._free_rows.append(self._rows.pop(seq))
            self._synced.pop(seq, None)
        if not self._free_rows:
            raise RuntimeError("no free decode row: more running sequences than max_num_seqs")
