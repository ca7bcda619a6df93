"""Continuous batching with chunked prefill and preemption by recompute.

Each step spends a token budget: running sequences first (one token for a decode, the next
chunk for an unfinished prefill), then waiting sequences in arrival order while blocks, budget
and batch slots last. When a running sequence needs a block and none is free, the newest
running sequence is preempted: its blocks are freed and it waits to be recomputed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tandem.engine.block_manager import BlockManager
from tandem.engine.config import EngineConfig
from tandem.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # new tokens computed this step, from seq.num_computed_tokens on

    @property
    def completes(self) -> bool:
        """This chunk reaches the sequence's last token, so a next token is sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        """Pick this step's work: decodes (one token) first, then prefill chunks."""
        budget = self.max_num_batched_tokens
        batch: list[ScheduledChunk] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            # Offloaded sequences hold no blocks here (their KV is on attention workers).
            while seq.offload is None and not self.blocks.grow(seq, seq.num_computed_tokens + n):
                preempted = True
                victim = next(s for s in reversed(self.running) if s.offload is None)
                if self._preempt(victim) is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                batch.append(ScheduledChunk(seq, n))
                budget -= n
                i += 1
        # Admitting new work right after a preemption would just evict it again.
        while not preempted and self.waiting and budget > 0 \
                and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.offload is not None:  # decoding already, with no blocks to find here
                self.waiting.popleft()
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                batch.append(ScheduledChunk(seq, 1))
                budget -= 1
                continue
            hits = [] if seq.block_table else self.blocks.match_prefix(seq)
            start = seq.num_computed_tokens + len(hits) * self.blocks.block_size
            n = min(seq.num_tokens - start, budget)
            if not self.blocks.can_admit(seq, hits, start + n):
                break
            self.waiting.popleft()
            if hits:
                self.blocks.take_prefix(seq, hits)
            self.blocks.grow(seq, start + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.append(ScheduledChunk(seq, n))
            budget -= n
        batch.sort(key=lambda c: c.num_tokens != 1)  # decodes first, stable otherwise
        return batch

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of the queues (finished, prefilled or aborted); blocks stay with it."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> Sequence:
        self.running.remove(seq)
        if seq.on_preempt is not None and seq.block_table:
            self.blocks.pin(seq.block_table)
            seq.on_preempt(list(seq.block_table))
        self.blocks.free_blocks(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0  # loaded KV is recomputed too
        seq.num_recomputed_tokens, seq.cacheable_tokens = 0, None  # ... exactly, blended or not
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        return seq
