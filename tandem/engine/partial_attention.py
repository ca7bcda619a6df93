"""Attention over part of a sequence's KV, and the exact merge of such parts (DistAttention).

When a sequence's KV is split by token range over several holders (attention workers, and the
decode worker's own term for the new token), each holder returns, per query head, its softmax-
weighted output over the keys it holds and the log-sum-exp of those scores. The parts merge
exactly: with m = max lse_i and w_i = exp(lse_i - m),

    out = sum_i w_i * out_i / sum_i w_i,    lse = m + log(sum_i w_i).

A holder with no keys for a sequence returns out 0 and lse -inf, which merges to weight 0; if
every part is empty the result is out 0 and lse -inf, never NaN. Scores, outputs and lse are
fp32 whatever the KV dtype, so the merge adds no rounding of its own beyond fp32.
"""

from __future__ import annotations

import torch

from tandem.engine.triton_attention import paged_decode_attention
from tandem.engine.triton_ops import runs_on


def attend_with_lse(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    lengths: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over a part of each sequence's KV.

    q [B, Hq, D]; keys and values [B, Hkv, L, D] (Hq a multiple of Hkv: query heads share KV
    heads, GQA), of which the first `lengths[b]` tokens are sequence b's (the rest padding);
    returns out [B, Hq, D] and lse [B, Hq], both fp32."""
    b, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not share {num_kv_heads} KV heads evenly")
    grouped = q.float().view(b, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = grouped @ keys.float().transpose(-1, -2) * scale  # [B, Hkv, G, L]
    held = torch.arange(keys.shape[2], device=q.device) < lengths.view(b, 1, 1, 1)
    scores = scores.masked_fill(~held, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where a sequence holds no keys here
    weights = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0).unsqueeze(-1))
    out = weights @ values.float()  # [B, Hkv, G, D]; rows with no keys are 0
    return out.reshape(b, num_heads, head_dim), lse.reshape(b, num_heads)


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge P partial attentions exactly: outs [P, B, Hq, D], lses [P, B, Hq] (fp32) ->
    out [B, Hq, D] and lse [B, Hq]."""
    if outs.shape[:-1] != lses.shape:
        raise ValueError(f"partial outputs {tuple(outs.shape)} and lse {tuple(lses.shape)} "
                         "do not match")
    m = lses.max(dim=0).values  # [B, Hq]
    empty = m == float("-inf")  # no part held a key
    weights = torch.exp(lses - m.masked_fill(empty, 0))  # exp(-inf) = 0 for empty parts
    total = weights.sum(dim=0)
    out = (weights.unsqueeze(-1) * outs).sum(dim=0) / total.clamp_min(1e-30).unsqueeze(-1)
    lse = torch.where(empty, m, m + torch.log(total.clamp_min(1e-30)))
    return out.masked_fill(empty.unsqueeze(-1), 0.0), lse


def paged_attend_with_lse(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                          tables: torch.Tensor, lengths: torch.Tensor, scale: float,
                          mask: torch.Tensor | None = None) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """`attend_with_lse` over paged KV: pools [blocks, block_size, Hkv, D], sequence b's keys
    in blocks tables[b] (the first lengths[b] tokens). CUDA: the paged decode kernel with LSE;
    CPU: torch's flash-attention kernel, which returns the LSE too, in the KV's dtype with fp32
    accumulation (`mask`: the additive [B, 1, 1, L] mask of `additive_mask`, if built already).
    Returns out [B, Hq, D] and lse [B, Hq], fp32."""
    if q.device.type == "cuda" and runs_on(q.device):
        out, lse = paged_decode_attention(q.to(k_pool.dtype), k_pool, v_pool, tables,
                                          lengths.to(torch.int32), scale, return_lse=True)
        return out.float(), lse
    b, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[2]
    keys = k_pool[tables].flatten(1, 2).transpose(1, 2)  # [B, Hkv, width * bs, D]
    values = v_pool[tables].flatten(1, 2).transpose(1, 2)
    if mask is None:
        mask = additive_mask(lengths, keys.shape[2], keys.dtype)
    grouped = q.to(keys.dtype).view(b, num_kv_heads, num_heads // num_kv_heads, head_dim)
    try:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            grouped, keys, values, 0.0, False, attn_mask=mask, scale=scale)
    except (RuntimeError, AttributeError):  # a torch without it: the plain fp32 path
        return attend_with_lse(q, keys, values, lengths, scale)
    empty = (lengths == 0).view(b, 1)  # the kernel gives lse 0 there; no key means -inf
    lse = lse.reshape(b, num_heads).float().masked_fill(empty, float("-inf"))
    out = out.reshape(b, num_heads, head_dim).float().masked_fill(empty.unsqueeze(-1), 0.0)
    return out, lse


def additive_mask(lengths: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, width]: 0 for the first lengths[b] keys of row b, -inf after."""
    held = torch.arange(width, device=lengths.device) < lengths.view(-1, 1)
    return torch.zeros(held.shape, dtype=dtype, device=lengths.device) \
        .masked_fill(~held, float("-inf")).view(-1, 1, 1, width)
