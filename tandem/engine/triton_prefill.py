"""Paged prefill attention: chunks of new tokens attend causally to their cached context and to
themselves, with K/V read straight from the block pool (never gathered into a dense buffer).

The chunks are laid out flat like varlen flash attention: chunk s owns query rows
[query_starts[s], query_starts[s + 1]) and its keys are the first context_lens[s] tokens of
block table row s, the chunk's own keys already written at the end. One program handles one
(query tile, chunk, query head); tiles past a chunk's length exit at once, so the grid can be
sized from the longest chunk alone. `reference_prefill_attention` is the torch oracle.
"""

from __future__ import annotations

import math

import torch

from tandem.engine.triton_attention import (
    _LOG2E,
    HAS_TRITON,
    _check_int32,
    _check_kernel_shapes,
    _unit_last_stride,
    _validate_pools,
    needs_f32_dot,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from tandem.engine.triton_attention import paged_kv_tile


    @triton.jit
    def _paged_prefill_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, starts_ptr, lens_ptr, qk_scale,
        stride_qt, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ot, stride_oh,
        stride_btb,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        tile = tl.program_id(0)
        chunk = tl.program_id(1).to(tl.int64)
        head = tl.program_id(2)
        q_start = tl.load(starts_ptr + chunk)
        num_q = tl.load(starts_ptr + chunk + 1) - q_start
        if tile * BLOCK_M >= num_q:
            return
        ctx_len = tl.load(lens_ptr + chunk)
        kv_head = head // GROUP

        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_q
        # The chunk's queries are the last num_q positions of its context.
        pos = ctx_len - num_q + rows
        dims = tl.arange(0, HEAD_DIM)
        token = (q_start + rows).to(tl.int64)
        q = tl.load(q_ptr + token[:, None] * stride_qt + head * stride_qh + dims[None, :],
                    mask=row_ok[:, None], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # No row of this tile sees past its last query's position, so stop reading keys there.
        # Key 0 is visible to every row, so the first tile leaves no row all -inf (no NaN).
        hi = tl.minimum(ctx_len, ctx_len - num_q + (tile + 1) * BLOCK_M)
        for start in range(0, hi, BLOCK_N):
            toks = start + tl.arange(0, BLOCK_N)
            tok_ok = toks < hi
            k, v = paged_kv_tile(k_ptr, v_ptr, bt_ptr + chunk * stride_btb, toks, tok_ok,
                                 kv_head, dims, stride_kb, stride_ks, stride_kh,
                                 stride_vb, stride_vs, stride_vh, BLOCK_SIZE)
            if DOT_F32:
                k = k.to(tl.float32)

            # "ieee" stops fp32 inputs being truncated to TF32; it is ignored for 16-bit inputs.
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            visible = tok_ok[None, :] & (toks[None, :] <= pos[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            p = p.to(v_ptr.dtype.element_ty)  # matching dot operands; 16-bit uses tensor cores
            if DOT_F32:
                p = p.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new

        out = acc / l_i[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def _validate(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
              block_tables: torch.Tensor, query_starts: torch.Tensor,
              context_lens: torch.Tensor, max_query_len: int) -> None:
    _validate_pools(q, k_pool, v_pool)
    if query_starts.dim() != 1 or query_starts.shape[0] < 1:
        raise ValueError(f"query_starts must be [chunks + 1], got {tuple(query_starts.shape)}")
    chunks = query_starts.shape[0] - 1
    if block_tables.dim() != 2 or block_tables.shape[0] != chunks:
        raise ValueError(f"block_tables must be [{chunks}, max_blocks], "
                         f"got {tuple(block_tables.shape)}")
    if context_lens.shape != (chunks,):
        raise ValueError(f"context_lens must be [{chunks}], got {tuple(context_lens.shape)}")
    _check_int32(query_starts=query_starts, block_tables=block_tables,
                 context_lens=context_lens)
    if max_query_len < 0:
        raise ValueError(f"max_query_len must be >= 0, got {max_query_len}")


def paged_prefill_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
    query_starts: torch.Tensor, context_lens: torch.Tensor, scale: float, max_query_len: int,
) -> torch.Tensor:
    """Causal attention of each chunk's queries over its paged context; out [N, Hq, D].

    Preconditions (not checked, they would cost a device sync): query_starts is
    non-decreasing with query_starts[-1] <= N, every chunk has at most max_query_len queries
    and num_q <= context_lens[s] <= max_blocks * block_size, and the chunk's K/V are already
    in the pool. Rows of q outside every chunk are left unwritten in the output.
    """
    if not HAS_TRITON:
        raise RuntimeError("paged_prefill_attention needs triton, which is not installed")
    _validate(q, k_pool, v_pool, block_tables, query_starts, context_lens, max_query_len)
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_pool.shape
    _check_kernel_shapes(head_dim, block_size)
    q, k_pool, v_pool, block_tables, query_starts, context_lens = map(
        _unit_last_stride, (q, k_pool, v_pool, block_tables, query_starts, context_lens))
    out = q.new_empty(q.shape)
    chunks = block_tables.shape[0]
    if chunks == 0 or max_query_len == 0 or q.shape[0] == 0:
        return out
    # Bigger tiles amortize K/V loads on the GPU; the interpreter is faster with small ones.
    on_gpu = q.device.type == "cuda"
    block_m = 64 if on_gpu else 16
    block_n = 64 if on_gpu else 16  # keys per tile, whatever the block size (shared memory)
    grid = (triton.cdiv(max_query_len, block_m), chunks, num_heads)
    _paged_prefill_kernel[grid](
        q, k_pool, v_pool, out, block_tables, query_starts, context_lens, scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, DOT_F32=needs_f32_dot(q),
    )
    return out


def reference_prefill_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
    query_starts: torch.Tensor, context_lens: torch.Tensor, scale: float, max_query_len: int,
) -> torch.Tensor:
    """Plain-torch prefill attention: gather each chunk's context, causal softmax in float32.

    Unlike the kernel it checks the host-side preconditions, since it reads the lengths anyway.
    """
    _validate(q, k_pool, v_pool, block_tables, query_starts, context_lens, max_query_len)
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_pool.shape
    group = num_heads // num_kv_heads
    starts = query_starts.tolist()
    out = torch.zeros_like(q)
    for s, n in enumerate(context_lens.tolist()):
        lo, hi = starts[s], starts[s + 1]
        num_q = hi - lo
        if not 0 <= num_q <= min(n, max_query_len):
            raise ValueError(f"chunk {s} has {num_q} queries, context {n}, max {max_query_len}")
        if num_q == 0:
            continue
        ids = block_tables[s, : math.ceil(n / block_size)].long()
        k = k_pool[ids].reshape(-1, num_kv_heads, head_dim)[:n].float()
        v = v_pool[ids].reshape(-1, num_kv_heads, head_dim)[:n].float()
        k = k.repeat_interleave(group, dim=1)  # [n, num_heads, head_dim]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,nhd->hqn", q[lo:hi].float(), k) * scale
        positions = torch.arange(n - num_q, n, device=q.device)
        visible = torch.arange(n, device=q.device)[None, :] <= positions[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[lo:hi] = torch.einsum("hqn,nhd->qhd", scores.softmax(dim=-1), v).to(q.dtype)
    return out
