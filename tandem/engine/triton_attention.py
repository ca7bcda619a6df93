"""Paged decode attention: one query token per sequence, K/V read straight from the block pool.

The Triton kernel walks each sequence's block table itself, so decode never gathers the cache
into a contiguous buffer. One program handles one (sequence, kv head) pair and all query heads
that share that kv head, so every K/V tile is loaded once per group instead of once per head.
`reference_decode_attention` is the plain-torch oracle the kernel is tested against.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs still import this module; the wrapper raises instead.
    HAS_TRITON = False

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


if HAS_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, lens_ptr, qk_scale,
        stride_qb, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ob, stride_oh,
        stride_btb,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        ctx_len = tl.load(lens_ptr + seq)

        rows = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, HEAD_DIM)
        row_ok = rows < GROUP
        heads = kv_head * GROUP + rows
        q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)

        # A tile may span several blocks (TILE >= 16 keeps tl.dot legal for tiny block sizes),
        # so each token looks up its own block id rather than one id per iteration.
        for start in range(0, ctx_len, TILE):
            toks = start + tl.arange(0, TILE)
            tok_ok = toks < ctx_len
            block = tl.load(bt_ptr + seq * stride_btb + toks // BLOCK_SIZE, mask=tok_ok, other=0)
            # int64: block * stride overflows int32 once the pool passes 2**31 elements.
            block = block.to(tl.int64)
            slot = toks % BLOCK_SIZE
            k_off = block * stride_kb + slot * stride_ks + kv_head * stride_kh
            v_off = block * stride_vb + slot * stride_vs + kv_head * stride_vh
            k = tl.load(k_ptr + k_off[:, None] + dims[None, :], mask=tok_ok[:, None], other=0.0)
            v = tl.load(v_ptr + v_off[:, None] + dims[None, :], mask=tok_ok[:, None], other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)

            # "ieee" stops fp32 inputs being truncated to TF32; it is ignored for 16-bit inputs.
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            s = tl.where(tok_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            # tl.dot wants matching operand dtypes; a 16-bit p keeps the PV product on tensor cores.
            p = p.to(v_ptr.dtype.element_ty)
            if DOT_F32:
                p = p.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new

        out = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def _validate(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
              block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, num_heads, head_dim], got shape {tuple(q.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q has dtype {q.dtype}, expected one of {_FLOAT_DTYPES}")
    if k_pool.dim() != 4:
        raise ValueError("k_pool must be [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got shape {tuple(k_pool.shape)}")
    if v_pool.shape != k_pool.shape:
        raise ValueError(f"v_pool shape {tuple(v_pool.shape)} != k_pool {tuple(k_pool.shape)}")
    for name, pool in (("k_pool", k_pool), ("v_pool", v_pool)):
        if pool.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {pool.dtype}, q has {q.dtype}")
    batch, num_heads, head_dim = q.shape
    _, _, num_kv_heads, pool_dim = k_pool.shape
    if pool_dim != head_dim:
        raise ValueError(f"k_pool head_dim {pool_dim} != q head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"q num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [{batch}, max_blocks], "
                         f"got {tuple(block_tables.shape)}")
    if block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32, got {block_tables.dtype}")
    if context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be [{batch}], got {tuple(context_lens.shape)}")
    if context_lens.dtype != torch.int32:
        raise ValueError(f"context_lens must be int32, got {context_lens.dtype}")


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Attention of each sequence's newest query token over its paged K/V.

    Precondition (not checked, it would cost a device sync): 1 <= context_lens[i] <=
    max_blocks_per_seq * block_size and the first blocks of each table row are valid ids.
    """
    if not HAS_TRITON:
        raise RuntimeError("paged_decode_attention needs triton, which is not installed")
    _validate(q, k_pool, v_pool, block_tables, context_lens)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_pool.shape
    for name, n in (("head_dim", head_dim), ("block_size", block_size)):
        if n & (n - 1):  # tl.arange only takes power-of-two extents
            raise ValueError(f"{name} must be a power of two, got {n}")
    # The kernel indexes the head_dim axis with unit stride.
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_pool = k_pool if k_pool.stride(-1) == 1 else k_pool.contiguous()
    v_pool = v_pool if v_pool.stride(-1) == 1 else v_pool.contiguous()
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return out

    group = num_heads // num_kv_heads
    # tl.dot needs every dimension >= 16; padded query rows are masked on load and store.
    group_pad = max(16, triton.next_power_of_2(group))
    tile = max(16, block_size)
    _paged_decode_kernel[(batch, num_kv_heads)](
        q, k_pool, v_pool, out, block_tables, context_lens, scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE=tile,
        # On CPU tensors the kernel runs in the Triton interpreter, whose tl.dot multiplies
        # bfloat16 operands as their raw uint16 bits; upcasting there sidesteps that bug.
        DOT_F32=q.device.type == "cpu" and q.dtype == torch.bfloat16,
    )
    return out


def reference_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """Plain-torch decode attention: gather each sequence's blocks, softmax in float32."""
    _validate(q, k_pool, v_pool, block_tables, context_lens)
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_pool.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for i, n in enumerate(context_lens.tolist()):
        ids = block_tables[i, : math.ceil(n / block_size)].long()
        k = k_pool[ids].reshape(-1, num_kv_heads, head_dim)[:n].float()
        v = v_pool[ids].reshape(-1, num_kv_heads, head_dim)[:n].float()
        k = k.repeat_interleave(group, dim=1)  # [n, num_heads, head_dim]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale
        out[i] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v).to(q.dtype)
    return out
