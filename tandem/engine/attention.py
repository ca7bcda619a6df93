"""Paged attention over the block pool, and the per-step context that describes the batch.

A step's tokens are laid out flat: first one token per decoding sequence, then each prefill
chunk in turn. Decodes attend as one padded batch (or through the Triton kernel on CUDA);
each prefill chunk attends to its cached context plus itself, causally.
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
    """The decoding sequences, one query token each, as the first `size` flat tokens."""

    size: int
    slots: torch.Tensor  # [size, max_context] flat slots (padding points at slot 0)
    mask: torch.Tensor  # [size, 1, 1, max_context] bool
    block_tables: torch.Tensor  # [size, max_blocks] int32, for the paged kernel
    context_lens: torch.Tensor  # [size] int32


@dataclass
class ForwardContext:
    """Everything a forward pass needs besides the tokens; passed explicitly, never global."""

    cache: KVCache
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's KV goes
    decode: DecodeBatch | None
    prefills: list[PrefillChunk] = field(default_factory=list)
    kv_hooks: list[LayerKVHook] = field(default_factory=list)
    use_triton: bool = False


def paged_attention(
    layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    ctx: ForwardContext, scale: float,
) -> torch.Tensor:
    """Store this step's k/v [T, Hkv, D] and attend with q [T, Hq, D]; returns [T, Hq, D]."""
    ctx.cache.write(layer, ctx.slot_mapping, k, v)
    for hook in ctx.kv_hooks:
        rows = slice(hook.start, hook.start + hook.num_tokens)
        hook.callback(layer, hook.first_position, k[rows], v[rows])
    k_pool, v_pool = ctx.cache.layer(layer)
    out = torch.empty_like(q)
    if ctx.decode is not None:
        n = ctx.decode.size
        out[:n] = _decode(q[:n], k_pool, v_pool, ctx.decode, scale, ctx.use_triton)
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
            q, k_pool, v_pool, batch.block_tables, batch.context_lens, scale)
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
