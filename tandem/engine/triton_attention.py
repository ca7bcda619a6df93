"""Paged decode attention: one query token per sequence, K/V read straight from the block pool.

The kernel walks each sequence's block table itself (no gather into a contiguous buffer). One
program handles one (sequence, kv head, split) and all query heads sharing that kv head, so each
K/V tile is loaded once per group. Flash-decoding: the context is cut into `num_splits`
tile-aligned ranges, one program each, so small batches still fill the GPU; each split writes an
fp32 partial output and its log-sum-exp, and a second kernel merges them. The split count is a
launch constant and each sequence's split length is derived on the device from its own context
length: a launch never reads device data on the host, so it can be captured in a CUDA graph.
`reference_decode_attention` is the plain-torch oracle for the tests.
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
MIN_SPLIT_TOKENS = 256  # below this a split's partial write/merge costs more than it saves
MAX_SPLITS = 32


if HAS_TRITON:

    @triton.jit
    def paged_kv_tile(k_ptr, v_ptr, table_ptr, toks, tok_ok, kv_head, dims,
                      stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                      BLOCK_SIZE: tl.constexpr):
        """K and V [tile, head_dim] of one kv head at token positions `toks` of a sequence
        whose block table starts at `table_ptr`; masked tokens read 0. A tile may span several
        blocks (or part of one), so each token looks up its own block id."""
        block = tl.load(table_ptr + toks // BLOCK_SIZE, mask=tok_ok, other=0)
        # int64: block * stride overflows int32 once the pool passes 2**31 elements.
        block = block.to(tl.int64)
        slot = toks % BLOCK_SIZE
        k_off = block * stride_kb + slot * stride_ks + kv_head * stride_kh
        v_off = block * stride_vb + slot * stride_vs + kv_head * stride_vh
        k = tl.load(k_ptr + k_off[:, None] + dims[None, :], mask=tok_ok[:, None], other=0.0)
        v = tl.load(v_ptr + v_off[:, None] + dims[None, :], mask=tok_ok[:, None], other=0.0)
        return k, v

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, bt_ptr, rows_ptr, lens_ptr, qk_scale,
        stride_qb, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ob, stride_oh, stride_os,
        stride_lb, stride_lh, stride_ls,
        stride_btb, num_splits,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        seq = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        ctx_len = tl.load(lens_ptr + seq)
        table_row = tl.load(rows_ptr + seq).to(tl.int64)
        # Each sequence's splits share its own context evenly, in whole tiles, so no tile
        # straddles two splits and the token mask below only needs the context length.
        split_len = tl.cdiv(tl.cdiv(ctx_len, num_splits), TILE) * TILE
        lo = split * split_len
        hi = tl.minimum(lo + split_len, ctx_len)

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

        for start in range(lo, hi, TILE):  # TILE >= 16 keeps tl.dot legal
            toks = start + tl.arange(0, TILE)
            tok_ok = toks < ctx_len
            k, v = paged_kv_tile(k_ptr, v_ptr, bt_ptr + table_row * stride_btb, toks, tok_ok,
                                 kv_head, dims, stride_kb, stride_ks, stride_kh,
                                 stride_vb, stride_vs, stride_vh, BLOCK_SIZE)
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

        # An empty split (or an empty context) has l_i == 0: it must write 0 and -inf, not NaN,
        # because the merge weighs every split's output, and 0 * NaN would poison the sum.
        nonempty = l_i > 0
        l_safe = tl.where(nonempty, l_i, 1.0)
        out = acc / l_safe[:, None]
        # Scores were in log2 units (qk_scale carries log2(e)); convert back to natural log.
        lse = tl.where(nonempty, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os
                 + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split * stride_ls, lse,
                 mask=row_ok)

    @triton.jit
    def _merge_splits_kernel(
        part_ptr, part_lse_ptr, out_ptr, lse_ptr,
        stride_pb, stride_ph, stride_ps, stride_plb, stride_plh,
        stride_ob, stride_oh, stride_lb, stride_lh, num_splits,
        SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        seq = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        splits = tl.arange(0, SPLITS_PAD)
        dims = tl.arange(0, HEAD_DIM)
        split_ok = splits < num_splits
        lse = tl.load(part_lse_ptr + seq * stride_plb + head * stride_plh + splits,
                      mask=split_ok, other=float("-inf"))
        part = tl.load(part_ptr + seq * stride_pb + head * stride_ph
                       + splits[:, None] * stride_ps + dims[None, :],
                       mask=split_ok[:, None], other=0.0)
        m = tl.max(lse, 0)
        # All splits empty: shift by 0 instead of -inf so the weights come out 0, not NaN.
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp(lse - m)
        total = tl.sum(w, 0)
        total_safe = tl.where(total > 0, total, 1.0)
        out = tl.sum(w[:, None] * part, 0) / total_safe
        tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims,
                 out.to(out_ptr.dtype.element_ty))
        tl.store(lse_ptr + seq * stride_lb + head * stride_lh,
                 tl.where(total > 0, m + tl.log(total_safe), float("-inf")))


def _validate_pools(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> None:
    """Checks shared by the decode and prefill kernels: q [*, Hq, D] against the pools."""
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
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
    _, num_heads, head_dim = q.shape
    _, _, num_kv_heads, pool_dim = k_pool.shape
    if pool_dim != head_dim:
        raise ValueError(f"k_pool head_dim {pool_dim} != q head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"q num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")


def _check_kernel_shapes(head_dim: int, block_size: int) -> None:
    for name, n in (("head_dim", head_dim), ("block_size", block_size)):
        if n & (n - 1):  # tl.arange only takes power-of-two extents
            raise ValueError(f"{name} must be a power of two, got {n}")


def _check_int32(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the innermost axis with unit stride; copy only when it is not."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _validate(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
              block_tables: torch.Tensor, context_lens: torch.Tensor,
              seq_rows: torch.Tensor | None) -> None:
    _validate_pools(q, k_pool, v_pool)
    batch = q.shape[0]
    # Without seq_rows sequence i reads row i; with it any row may be shared or skipped.
    min_rows = batch if seq_rows is None else 1
    if block_tables.dim() != 2 or block_tables.shape[0] < min_rows:
        raise ValueError(f"block_tables must be [rows >= {min_rows}, max_blocks], "
                         f"got {tuple(block_tables.shape)}")
    _check_int32(block_tables=block_tables, context_lens=context_lens)
    if context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be [{batch}], got {tuple(context_lens.shape)}")
    if seq_rows is not None:
        if seq_rows.shape != (batch,):
            raise ValueError(f"seq_rows must be [{batch}], got {tuple(seq_rows.shape)}")
        if seq_rows.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"seq_rows must be int32 or int64, got {seq_rows.dtype}")


def pick_num_splits(batch: int, num_kv_heads: int, max_context: int,
                    device: torch.device) -> int:
    """Splits per sequence from host-known shapes only (never device data: graph capture).

    Enough programs that batch * kv_heads * splits covers about two waves of SMs, but no split
    of the worst-case context under MIN_SPLIT_TOKENS and never more than MAX_SPLITS. The
    interpreter (CPU) runs programs one after another, so there splitting only adds work.
    """
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = math.ceil(2 * sms / max(1, batch * num_kv_heads))
    return max(1, min(wanted, max_context // MIN_SPLIT_TOKENS, MAX_SPLITS))


def paged_decode_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float, *,
    seq_rows: torch.Tensor | None = None, num_splits: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each sequence's newest query token over its paged K/V.

    Sequence i reads block table row seq_rows[i] (default i). Returns out [B, Hq, D] in q's
    dtype, plus lse [B, Hq] fp32 (natural log of sum exp(score * scale)) with return_lse.
    A zero context length gives out 0 and lse -inf. Precondition (not checked, it would cost a
    device sync): context_lens[i] <= max_blocks * block_size, 0 <= seq_rows[i] < rows, and
    the first ceil(context_lens[i] / block_size) ids of the row are valid blocks.
    """
    if not HAS_TRITON:
        raise RuntimeError("paged_decode_attention needs triton, which is not installed")
    _validate(q, k_pool, v_pool, block_tables, context_lens, seq_rows)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_pool.shape
    _check_kernel_shapes(head_dim, block_size)
    if num_splits is None:
        num_splits = pick_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size,
                                     q.device)
    elif num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    q, k_pool, v_pool, block_tables, context_lens = map(
        _unit_last_stride, (q, k_pool, v_pool, block_tables, context_lens))
    out = q.new_empty((batch, num_heads, head_dim))
    lse = q.new_empty((batch, num_heads), dtype=torch.float32)
    if batch == 0:
        return (out, lse) if return_lse else out
    seq_rows = torch.arange(batch, dtype=torch.int32, device=q.device) if seq_rows is None \
        else _unit_last_stride(seq_rows)

    # One split is the answer itself: no partials, no merge.
    part = out.unsqueeze(2) if num_splits == 1 else q.new_empty(
        (batch, num_heads, num_splits, head_dim), dtype=torch.float32)
    part_lse = lse.unsqueeze(2) if num_splits == 1 else lse.new_empty(
        (batch, num_heads, num_splits))
    group = num_heads // num_kv_heads
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_pool, v_pool, part, part_lse, block_tables, seq_rows, context_lens,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        part.stride(0), part.stride(1), part.stride(2),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        block_tables.stride(0), num_splits,
        GROUP=group,
        # tl.dot needs every dimension >= 16; padded query rows are masked on load and store.
        GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        # Each token looks up its own block, so the tile need not follow block_size (a tile of
        # 256-token blocks would overflow shared memory); 16 keeps the interpreter quick.
        BLOCK_SIZE=block_size, TILE=64 if q.is_cuda else 16, DOT_F32=needs_f32_dot(q),
    )
    if num_splits > 1:
        _merge_splits_kernel[(batch, num_heads)](
            part, part_lse, out, lse,
            part.stride(0), part.stride(1), part.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
        )
    return (out, lse) if return_lse else out


def needs_f32_dot(q: torch.Tensor) -> bool:
    """True when tl.dot must run in fp32: on CPU tensors the kernel runs in the Triton
    interpreter, whose tl.dot multiplies bfloat16 operands as their raw uint16 bits."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16


def reference_decode_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float, *,
    seq_rows: torch.Tensor | None = None, return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch decode attention: gather each sequence's blocks, softmax in float32."""
    _validate(q, k_pool, v_pool, block_tables, context_lens, seq_rows)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_pool.shape
    group = num_heads // num_kv_heads
    rows = list(range(batch)) if seq_rows is None else seq_rows.tolist()
    out = torch.zeros_like(q)
    lse = torch.full((batch, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for i, (row, n) in enumerate(zip(rows, context_lens.tolist(), strict=True)):
        if n == 0:
            continue
        ids = block_tables[row, : math.ceil(n / block_size)].long()
        k = k_pool[ids].reshape(-1, num_kv_heads, head_dim)[:n].float()
        v = v_pool[ids].reshape(-1, num_kv_heads, head_dim)[:n].float()
        k = k.repeat_interleave(group, dim=1)  # [n, num_heads, head_dim]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale
        lse[i] = scores.logsumexp(dim=-1)
        out[i] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v).to(q.dtype)
    return (out, lse) if return_lse else out
