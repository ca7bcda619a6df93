"""Paged attention over the block pool, and the per-step context that describes the batch.

A step's tokens are laid out flat: first one token per decoding sequence, then each prefill
chunk in turn. The layer's `pre_attn` has already stored the step's K/V in the pool. Decodes
attend as one padded batch on CPU, or through the Triton flash-decoding kernel on CUDA; each
prefill chunk attends to its cached context plus itself, causally (gathered and run through SDPA
on CPU, one paged Triton kernel for all chunks on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tandem.engine.kv_cache import KVCache

LayerKVCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""Called as (layer, first_position, keys, values) once a layer's new KV is in the cache.
keys/values are [tokens, kv_heads, head_dim] views valid only during the call: copy to keep."""


@dataclass
class PrefillChunk:
    """One sequence's run of new tokens in the flat batch, attending to `context_len` tokens."""

    start: int
    num_tokens: int
    context_len: int
    context_slots: torch.Tensor | None  # [context_len] flat slots; None when nothing was cached
    mask: torch.Tensor | None  # [num_tokens, context_len] bool; None when nothing was cached


@dataclass
class LayerKVHook:
    """Hands rows [start, start + num_tokens) of each layer's new KV to `callback`."""

    start: int
    num_tokens: int
    first_position: int
    callback: LayerKVCallback


@dataclass
class DecodeBatch:
    """The decoding sequences, one query token each, as the first `size` flat tokens.

    On CUDA the Triton kernel walks `block_tables` itself (row `seq_rows[i]` for sequence i); on
    CPU the sequences' slots are gathered once per step (`slots`, `mask`) and shared by layers.
    """

    size: int
    block_tables: torch.Tensor  # [rows, max_blocks] int32
    context_lens: torch.Tensor  # [size] int32
    seq_rows: torch.Tensor | None = None  # [size]; None: sequence i uses row i
    num_splits: int | None = None  # flash-decoding splits (fixed for a captured graph)
    slots: torch.Tensor | None = None  # [size, max_context] flat slots (padding reads slot 0)
    mask: torch.Tensor | None = None  # [size, 1, 1, max_context] bool


@dataclass
class PrefillBatch:
    """The prefill chunks as one varlen batch, for the Triton kernel (CUDA)."""

    start: int  # first flat token of the first chunk (they are contiguous, after the decodes)
    query_starts: torch.Tensor  # [chunks + 1] int32, relative to `start`
    context_lens: torch.Tensor  # [chunks] int32: cached context plus the chunk itself
    block_tables: torch.Tensor  # [chunks, max_blocks] int32
    max_query_len: int


@dataclass
class ForwardContext:
    """Everything a forward pass needs besides the tokens; passed explicitly, never global."""

    cache: KVCache
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's KV goes
    decode: DecodeBatch | None
    prefills: list[PrefillChunk] = field(default_factory=list)
    kv_hooks: list[LayerKVHook] = field(default_factory=list)
    use_triton: bool = False
    prefill_batch: PrefillBatch | None = None  # set on the Triton path


def paged_attention(
    layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    ctx: ForwardContext, scale: float,
) -> torch.Tensor:
    """Attend with q [T, Hq, D] over the cache, where this step's k/v [T, Hkv, D] were already
    stored (by the layer's `pre_attn`); returns [T, Hq, D]."""
    for hook in ctx.kv_hooks:
        rows = slice(hook.start, hook.start + hook.num_tokens)
        hook.callback(layer, hook.first_position, k[rows], v[rows])
    k_pool, v_pool = ctx.cache.layer(layer)
    if ctx.decode is not None and not ctx.prefills and ctx.prefill_batch is None:
        # A decode-only step: no copy into `out`.
        return _decode(q, k_pool, v_pool, ctx.decode, scale, ctx.use_triton)
    out = torch.empty_like(q)
    if ctx.decode is not None:
        n = ctx.decode.size
        out[:n] = _decode(q[:n], k_pool, v_pool, ctx.decode, scale, ctx.use_triton)
    if ctx.prefill_batch is not None:
        from tandem.engine.triton_prefill import paged_prefill_attention

        p = ctx.prefill_batch
        out[p.start:] = paged_prefill_attention(
            q[p.start:], k_pool, v_pool, p.block_tables, p.query_starts, p.context_lens, scale,
            p.max_query_len)
        return out
    for chunk in ctx.prefills:
        rows = slice(chunk.start, chunk.start + chunk.num_tokens)
        out[rows] = _prefill(q[rows], k[rows], v[rows], k_pool, v_pool, chunk, scale)
    return out


def _decode(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch: DecodeBatch,
    scale: float, use_triton: bool,
) -> torch.Tensor:
    if use_triton:
        from tandem.engine.triton_attention import paged_decode_attention

        return paged_decode_attention(
            q, k_pool, v_pool, batch.block_tables, batch.context_lens, scale,
            seq_rows=batch.seq_rows, num_splits=batch.num_splits)
    b, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[2]
    keys = _gather(k_pool, batch.slots).transpose(1, 2)  # [B, Hkv, L, D]
    values = _gather(v_pool, batch.slots).transpose(1, 2)
    # Query heads sharing a KV head act as extra query rows: no KV expansion for GQA.
    grouped = q.view(b, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=batch.mask, scale=scale)
    return out.reshape(b, num_heads, head_dim)

def _prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_pool: torch.Tensor, v_pool: torch.Tensor, chunk: PrefillChunk, scale: float,
) -> torch.Tensor:
    if chunk.context_slots is not None:
        k = _gather(k_pool, chunk.context_slots)
        v = _gather(v_pool, chunk.context_slots)
    # 4-D [1, H, T, D] inputs: torch's CPU flash kernel ignores 3-D ones (6x slower math path).
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scale, enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def _gather(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of a [blocks, block_size, H, D] pool at flat slots of any shape -> [*slots, H, D]."""
    rows = pool.view(-1, *pool.shape[2:]).index_select(0, slots.reshape(-1))
    return rows.view(*slots.shape, *pool.shape[2:])
