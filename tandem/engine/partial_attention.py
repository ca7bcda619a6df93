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
                          tables: torch.Tensor, lengths: torch.Tensor, scale: float) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """`attend_with_lse` over paged KV: pools [blocks, block_size, Hkv, D], sequence b's keys
    in blocks tables[b] (the first lengths[b] tokens). CUDA: the paged decode kernel with LSE;
    elsewhere the blocks are gathered for `attend_with_lse`. out [B, Hq, D], lse [B, Hq], fp32."""
    if q.device.type == "cuda" and runs_on(q.device):
        out, lse = paged_decode_attention(q.to(k_pool.dtype), k_pool, v_pool, tables,
                                          lengths.to(torch.int32), scale, return_lse=True)
        return out.float(), lse
    b, width = tables.shape
    rows = width * k_pool.shape[1]
    flat = tables.reshape(-1)  # index_select: advanced indexing copies ~3x slower on CPU
    keys = k_pool.index_select(0, flat).view(b, rows, *k_pool.shape[2:]).transpose(1, 2)
    values = v_pool.index_select(0, flat).view(b, rows, *v_pool.shape[2:]).transpose(1, 2)
    return attend_with_lse(q, keys, values, lengths, scale)


def attend_run_with_lse(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's decode attention over one run of its KV, read in place: q [Hq, D], keys
    and values [L, Hkv, D] (L >= 1, any row stride); out [Hq, D] and lse [Hq], fp32. CPU:
    torch's flash kernel (it returns the LSE), in the KV's dtype with fp32 accumulation."""
    num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[1]
    grouped = q.to(keys.dtype).view(1, num_kv_heads, num_heads // num_kv_heads, head_dim)
    k, v = keys.unsqueeze(0).transpose(1, 2), values.unsqueeze(0).transpose(1, 2)
    try:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            grouped, k, v, 0.0, False, scale=scale)
    except (RuntimeError, AttributeError):  # a torch without it: the plain fp32 path
        out, lse = attend_with_lse(q[None], k, v, torch.tensor([keys.shape[0]]), scale)
    return out.reshape(num_heads, head_dim).float(), lse.reshape(num_heads).float()
