"""Host to device: the tensors of an eager step (prefill, mixed, or decode without graphs).

Every tensor is built on the host from the scheduled chunks and uploaded in one copy (pinned
and asynchronous on CUDA, so building the next inputs never waits for the device). Decode-only
steps on the fast path use `DecodeInputs` instead, which keeps block tables on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.engine.attention import (
    DecodeBatch,
    ForwardContext,
    LayerKVHook,
    PrefillBatch,
    PrefillChunk,
)
from tandem.engine.kv_cache import KVCache
from tandem.engine.scheduler import ScheduledChunk


@dataclass
class EagerStep:
    input_ids: torch.Tensor
    positions: torch.Tensor
    ctx: ForwardContext
    sample_rows: torch.Tensor | None  # flat rows whose logits are sampled; None: none


def upload(values: list[int], device: torch.device, dtype: torch.dtype = torch.long) \
        -> torch.Tensor:
    """A host list as a device tensor, without a synchronous copy on CUDA."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def gather_slots(tables: torch.Tensor, context_lens: torch.Tensor, max_len: int,
                 block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU decode path's flat slots [B, max_len] of each sequence's context (padding reads
    slot 0: finite, then masked out) and the matching mask [B, 1, 1, max_len]."""
    span = torch.arange(max_len, device=tables.device)
    slots = tables[:, span // block_size].long() * block_size + span % block_size
    mask = span.unsqueeze(0) < context_lens.unsqueeze(1)
    return slots.masked_fill(~mask, 0), mask[:, None, None, :]


def build_eager_step(batch: list[ScheduledChunk], cache: KVCache, use_triton: bool,
                     all_logits: bool = False) -> EagerStep:
    """Flatten `batch` (decodes first) into one forward pass's inputs."""
    device, bs = cache.data.device, cache.spec.block_size
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    sample_rows: list[int] = []
    hooks = []
    for chunk in batch:
        seq, start = chunk.seq, chunk.seq.num_computed_tokens
        pos = range(start, start + chunk.num_tokens)
        if seq.on_layer_kv is not None:
            hooks.append(LayerKVHook(len(input_ids), chunk.num_tokens, start, seq.on_layer_kv))
        input_ids.extend(seq.token_ids[start:start + chunk.num_tokens])
        positions.extend(pos)
        table = seq.block_table
        slots.extend(table[p // bs] * bs + p % bs for p in pos)
        if chunk.completes:
            sample_rows.append(len(input_ids) - 1)
    decodes = [c for c in batch if c.num_tokens == 1]
    prefills = [c for c in batch if c.num_tokens > 1]
    ctx = ForwardContext(
        cache=cache, slot_mapping=upload(slots, device),
        decode=_decode_batch(decodes, device, bs, use_triton),
        prefills=_prefill_chunks(batch, device, bs) if not use_triton else [],
        kv_hooks=hooks, use_triton=use_triton,
        prefill_batch=_prefill_batch(prefills, len(decodes), device) if use_triton else None)
    rows = None if all_logits or not sample_rows else upload(sample_rows, device)
    return EagerStep(upload(input_ids, device), upload(positions, device), ctx, rows)


def _tables(chunks: list[ScheduledChunk], device: torch.device) -> torch.Tensor:
    width = max(len(c.seq.block_table) for c in chunks)
    flat = [b for c in chunks for b in c.seq.block_table + [0] * (width - len(c.seq.block_table))]
    return upload(flat, device, torch.int32).view(len(chunks), width)


def _decode_batch(chunks: list[ScheduledChunk], device: torch.device, block_size: int,
                  use_triton: bool) -> DecodeBatch | None:
    if not chunks:
        return None
    lens = [c.seq.num_computed_tokens + 1 for c in chunks]
    tables, context_lens = _tables(chunks, device), upload(lens, device, torch.int32)
    batch = DecodeBatch(size=len(chunks), block_tables=tables, context_lens=context_lens)
    if not use_triton:
        batch.slots, batch.mask = gather_slots(tables, context_lens, max(lens), block_size)
    return batch


def _prefill_chunks(batch: list[ScheduledChunk], device: torch.device, block_size: int) \
        -> list[PrefillChunk]:
    """The CPU path: each chunk with cached context gathers it and masks causally."""
    chunks, start = [], 0
    for c in batch:
        if c.num_tokens > 1:
            begin, end = c.seq.num_computed_tokens, c.seq.num_computed_tokens + c.num_tokens
            slots = mask = None
            if begin > 0:  # attend to cached context too: gather it, mask causally
                span = torch.arange(end, device=device)
                table = torch.tensor(c.seq.block_table, dtype=torch.long, device=device)
                slots = table[span // block_size] * block_size + span % block_size
                queries = torch.arange(begin, end, device=device)
                mask = span.unsqueeze(0) <= queries.unsqueeze(1)
            chunks.append(PrefillChunk(start, c.num_tokens, end, slots, mask))
        start += c.num_tokens
    return chunks


def _prefill_batch(chunks: list[ScheduledChunk], start: int, device: torch.device) \
        -> PrefillBatch | None:
    """The CUDA path: every prefill chunk in one varlen description for the paged kernel."""
    if not chunks:
        return None
    starts = [0]
    for c in chunks:
        starts.append(starts[-1] + c.num_tokens)
    return PrefillBatch(
        start=start, query_starts=upload(starts, device, torch.int32),
        context_lens=upload([c.seq.num_computed_tokens + c.num_tokens for c in chunks], device,
                            torch.int32),
        block_tables=_tables(chunks, device),
        max_query_len=max(c.num_tokens for c in chunks))
