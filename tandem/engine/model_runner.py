"""The device side of a step: flatten the scheduled chunks into tensors, run the model, logits."""

from __future__ import annotations

import torch

from tandem.engine.attention import DecodeBatch, ForwardContext, LayerKVHook, PrefillChunk
from tandem.engine.kv_cache import KVCache
from tandem.engine.model import LlamaModel
from tandem.engine.scheduler import ScheduledChunk


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.block_size = cache.spec.block_size
        self.use_triton = device.type == "cuda" and _has_triton()

    @torch.inference_mode()
    def run(self, batch: list[ScheduledChunk], all_logits: bool = False) -> torch.Tensor:
        """Compute `batch` (decodes first); float32 logits for each chunk that `completes`,
        or for every token with `all_logits`."""
        input_ids, positions, slots, sample_rows, hooks = [], [], [], [], []
        for chunk in batch:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            pos = range(start, start + chunk.num_tokens)
            if seq.on_layer_kv is not None:
                hooks.append(LayerKVHook(len(input_ids), chunk.num_tokens, start, seq.on_layer_kv))
            input_ids.extend(seq.token_ids[start:start + chunk.num_tokens])
            positions.extend(pos)
            table, bs = seq.block_table, self.block_size
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            if chunk.completes:
                sample_rows.append(len(input_ids) - 1)
        ctx = ForwardContext(
            cache=self.cache,
            slot_mapping=self._tensor(slots),
            decode=self._decode_batch([c for c in batch if c.num_tokens == 1]),
            prefills=self._prefill_chunks(batch),
            kv_hooks=hooks,
            use_triton=self.use_triton,
        )
        hidden = self.model(self._tensor(input_ids), self._tensor(positions), ctx)
        if all_logits:
            return self.model.logits(hidden)
        if not sample_rows:
            return torch.empty(0)
        return self.model.logits(hidden[self._tensor(sample_rows)])

    def _decode_batch(self, chunks: list[ScheduledChunk]) -> DecodeBatch | None:
        if not chunks:
            return None
        lens = [c.seq.num_computed_tokens + 1 for c in chunks]
        max_blocks = max(len(c.seq.block_table) for c in chunks)
        tables = self._tensor([c.seq.block_table + [0] * (max_blocks - len(c.seq.block_table))
                               for c in chunks])
        context_lens = self._tensor(lens)
        span = torch.arange(max(lens), device=self.device)
        slots = tables[:, span // self.block_size] * self.block_size + span % self.block_size
        mask = span.unsqueeze(0) < context_lens.unsqueeze(1)
        slots = slots.masked_fill(~mask, 0)  # padding reads slot 0: finite, then masked out
        return DecodeBatch(
            size=len(chunks), slots=slots, mask=mask[:, None, None, :],
            block_tables=tables.to(torch.int32), context_lens=context_lens.to(torch.int32))

    def _prefill_chunks(self, batch: list[ScheduledChunk]) -> list[PrefillChunk]:
        chunks, start = [], 0
        for c in batch:
            if c.num_tokens > 1:
                begin, end = c.seq.num_computed_tokens, c.seq.num_computed_tokens + c.num_tokens
                slots = mask = None
                if begin > 0:  # attend to cached context too: gather it, mask causally
                    span = torch.arange(end, device=self.device)
                    table = self._tensor(c.seq.block_table)
                    slots = table[span // self.block_size] * self.block_size \
                        + span % self.block_size
                    queries = torch.arange(begin, end, device=self.device)
                    mask = span.unsqueeze(0) <= queries.unsqueeze(1)
                chunks.append(PrefillChunk(start, c.num_tokens, end, slots, mask))
            start += c.num_tokens
        return chunks

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


def _has_triton() -> bool:
    from tandem.engine.triton_attention import HAS_TRITON

    return HAS_TRITON
