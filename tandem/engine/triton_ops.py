"""Fused elementwise kernels for the CUDA decode path, each next to its torch reference.

A `reference_*` function defines the exact semantics, rounding included, so the kernel matches
the unfused model code bit for bit or within an ulp: rms_norm as RMSNorm in model.py (the
residual sum rounded first, as torch's add), silu_and_mul as F.silu(gate) * up, rope_and_cache
as rotary.rotate but in fp32 from fp32 tables, in place in the fused qkv, plus the cache write.
The public functions always launch the Triton kernel; on CPU tensors that is the interpreter
(TRITON_INTERPRET=1, for tests), so choosing the kernel or the reference is the caller's job.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs still import this module; the wrappers raise instead.
    HAS_TRITON = False

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)




def runs_on(device: torch.device) -> bool:
    """Whether the engine uses the Triton kernels on `device`: on CUDA when Triton is installed,
    and on CPU only under the Triton interpreter (how tests run the CUDA path without a GPU)."""
    return HAS_TRITON and (device.type == "cuda" or INTERPRETING)


if HAS_TRITON:

    @triton.jit
    def _round_as(x, ptr, RNE_BF16: tl.constexpr):
        """Round fp32 x to ptr's element type. The interpreter's fp32 -> bf16 cast truncates
        (the GPU's rounds to nearest even), so under RNE_BF16 the rounding is done on the bits."""
        if RNE_BF16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
        return x.to(ptr.dtype.element_ty)

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, sum_ptr,
                         stride_x, stride_r, stride_y, stride_s, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                         RNE_BF16: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            res = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
            # Round the sum before normalizing: the unfused model stores it in the dtype.
            x = _round_as(x + res, sum_ptr, RNE_BF16)
            tl.store(sum_ptr + row * stride_s + cols, x, mask=ok)
            x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
        normed = _round_as(x * rstd, y_ptr, RNE_BF16).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + cols, _round_as(normed * w, y_ptr, RNE_BF16), mask=ok)

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, y_ptr, stride_x, stride_y, n_cols,
                             BLOCK: tl.constexpr, RNE_BF16: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_cols
        gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        act = _round_as(gate / (1.0 + tl.exp(-gate)), y_ptr, RNE_BF16).to(tl.float32)
        tl.store(y_ptr + row * stride_y + cols, _round_as(act * up, y_ptr, RNE_BF16), mask=ok)

    @triton.jit
    def _rope_and_cache_kernel(
        qkv_ptr, pos_ptr, cos_ptr, sin_ptr, k_pool_ptr, v_pool_ptr, slots_ptr,
        stride_t, stride_cos, stride_sin,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, block_size,
        NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        HALF_PAD: tl.constexpr, HAS_POOL: tl.constexpr, RNE_BF16: tl.constexpr,
    ):
        # Program (token, head): heads [0, NUM_HEADS) are q, the next NUM_KV_HEADS are k; a k
        # program also carries the matching v head into the cache.
        tok = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        half: tl.constexpr = HEAD_DIM // 2
        cols = tl.arange(0, HALF_PAD)
        ok = cols < half
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        cos = tl.load(cos_ptr + pos * stride_cos + cols, mask=ok, other=0.0)
        sin = tl.load(sin_ptr + pos * stride_sin + cols, mask=ok, other=0.0)
        base = qkv_ptr + tok * stride_t + head * HEAD_DIM
        x1 = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(base + half + cols, mask=ok, other=0.0).to(tl.float32)
        out1 = _round_as(x1 * cos - x2 * sin, qkv_ptr, RNE_BF16)
        out2 = _round_as(x2 * cos + x1 * sin, qkv_ptr, RNE_BF16)
        tl.store(base + cols, out1, mask=ok)
        tl.store(base + half + cols, out2, mask=ok)
        # Nested on purpose: a constexpr-only `if` drops the cache write at compile time.
        if HAS_POOL:  # noqa: SIM102
            if head >= NUM_HEADS:
                slot = tl.load(slots_ptr + tok).to(tl.int64)
                if slot >= 0:  # negative slots mark padding tokens that own no cache slot
                    kv_head = head - NUM_HEADS
                    block = slot // block_size
                    offset = slot % block_size
                    k_dst = k_pool_ptr + block * stride_kb + offset * stride_ks \
                        + kv_head * stride_kh
                    tl.store(k_dst + cols, out1, mask=ok)
                    tl.store(k_dst + half + cols, out2, mask=ok)
                    v_src = base + NUM_KV_HEADS * HEAD_DIM
                    v_dst = v_pool_ptr + block * stride_vb + offset * stride_vs \
                        + kv_head * stride_vh
                    tl.store(v_dst + cols, tl.load(v_src + cols, mask=ok), mask=ok)
                    tl.store(v_dst + half + cols, tl.load(v_src + half + cols, mask=ok),
                             mask=ok)


def _interpreted_bf16(t: torch.Tensor) -> bool:
    """CPU tensors mean the Triton interpreter, whose bf16 casts need the rounding fix-up."""
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def _require_triton(name: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{name} needs triton, which is not installed")


def _check_rows(name: str, t: torch.Tensor, dims: int = 2) -> None:
    """A float tensor of `dims` dims whose last dim is contiguous (rows may be strided)."""
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}, expected one of {_FLOAT_DTYPES}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def _check_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    _check_rows("x", x)
    _check_rows("weight", weight, dims=1)
    if weight.shape[0] != x.shape[1] or weight.dtype != x.dtype:
        raise ValueError(f"weight must be [{x.shape[1]}] {x.dtype}, "
                         f"got {tuple(weight.shape)} {weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.stride(-1) != 1):
        raise ValueError(f"residual must be {tuple(x.shape)} {x.dtype}, contiguous in its "
                         f"last dim, got {tuple(residual.shape)} {residual.dtype}")


def _norm_launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One program per row; the whole row sits in registers (hidden sizes fit easily)."""
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    summed = torch.empty_like(y) if residual is not None else y
    if x.shape[0] == 0:
        return y, summed
    block = triton.next_power_of_2(x.shape[1])
    res = residual if residual is not None else x
    _rms_norm_kernel[(x.shape[0],)](
        x, res, weight, y, summed, x.stride(0), res.stride(0), y.stride(0), summed.stride(0),
        x.shape[1], eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
        RNE_BF16=_interpreted_bf16(x), num_warps=min(16, max(1, block // 512)),
    )
    return y, summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [T, H] by weight [H] (same dtype), as RMSNorm.forward in model.py."""
    _require_triton("rms_norm")
    _check_norm(x, weight, None)
    return _norm_launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; the sum is rounded to x.dtype."""
    _require_triton("add_rms_norm")
    _check_norm(x, weight, residual)
    return _norm_launch(x, residual, weight, eps)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_norm(x, weight, None)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def reference_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_norm(x, weight, residual)
    summed = x + residual
    return reference_rms_norm(summed, weight, eps), summed


def _check_gate_up(gate_up: torch.Tensor) -> None:
    _check_rows("gate_up", gate_up)
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2 * I], got odd width {gate_up.shape[1]}")


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2I] = [gate | up]; returns [T, I]."""
    _require_triton("silu_and_mul")
    _check_gate_up(gate_up)
    tokens, width = gate_up.shape
    out = gate_up.new_empty((tokens, width // 2))
    if out.numel() == 0:
        return out
    block = min(1024, triton.next_power_of_2(width // 2))
    grid = (tokens, triton.cdiv(width // 2, block))
    _silu_and_mul_kernel[grid](gate_up, out, gate_up.stride(0), out.stride(0), width // 2,
                               BLOCK=block, RNE_BF16=_interpreted_bf16(gate_up),
                               num_warps=max(1, block // 256))
    return out


def reference_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    _check_gate_up(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate.float()).to(gate_up.dtype) * up


def _check_rope(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                sin_table: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                k_pool: torch.Tensor | None, v_pool: torch.Tensor | None,
                slots: torch.Tensor | None) -> None:
    _check_rows("qkv", qkv)
    if head_dim % 2 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv must be [T, ({num_heads} + 2 * {num_kv_heads}) * {head_dim}] "
                         f"with an even head_dim, got {tuple(qkv.shape)}")
    for name, index in (("positions", positions), ("slots", slots)):
        if index is not None and (index.shape != qkv.shape[:1] or index.dtype not in _INDEX_DTYPES):
            raise ValueError(f"{name} must be [{qkv.shape[0]}] int32/int64, "
                             f"got {tuple(index.shape)} {index.dtype}")
    for name, table in (("cos_table", cos_table), ("sin_table", sin_table)):
        if table.dim() != 2 or table.shape[1] != head_dim // 2 or table.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 [max_positions, {head_dim // 2}], "
                             f"got {tuple(table.shape)} {table.dtype}")
        _check_rows(name, table)
    if (k_pool is None) != (v_pool is None) or (k_pool is None) != (slots is None):
        raise ValueError("k_pool, v_pool and slots must be given together or not at all")
    if k_pool is None or v_pool is None:
        return
    for name, pool in (("k_pool", k_pool), ("v_pool", v_pool)):
        _check_rows(name, pool, dims=4)
        if pool.shape[2:] != (num_kv_heads, head_dim) or pool.dtype != qkv.dtype:
            raise ValueError(f"{name} must be [blocks, block_size, {num_kv_heads}, {head_dim}] "
                             f"{qkv.dtype}, got {tuple(pool.shape)} {pool.dtype}")
    if v_pool.shape[:2] != k_pool.shape[:2]:
        raise ValueError(f"v_pool shape {tuple(v_pool.shape)} != k_pool {tuple(k_pool.shape)}")


def _split_heads(qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
                 head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heads = qkv.unflatten(1, (num_heads + 2 * num_kv_heads, head_dim))
    kv_end = num_heads + num_kv_heads
    return heads[:, :num_heads], heads[:, num_heads:kv_end], heads[:, kv_end:]


def rope_and_cache(
    qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
    sin_table: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    k_pool: torch.Tensor | None = None, v_pool: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate q and k in place inside qkv [T, (Hq + 2 Hkv) * D]; with pools, also write each
    token's rotated k and its v to flat slot slots[t] (skipped where slots[t] < 0).

    Returns q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D] as views of qkv. Precondition (not
    checked, it would cost a device sync): positions < max_positions, slots < pool slots.
    """
    _require_triton("rope_and_cache")
    _check_rope(qkv, positions, cos_table, sin_table, num_heads, num_kv_heads, head_dim,
                k_pool, v_pool, slots)
    views = _split_heads(qkv, num_heads, num_kv_heads, head_dim)
    if qkv.shape[0] == 0:
        return views
    positions = positions.contiguous()
    if k_pool is not None and v_pool is not None and slots is not None:
        pools = (k_pool, v_pool, slots.contiguous())
        pool_args = (*k_pool.stride()[:3], *v_pool.stride()[:3], k_pool.shape[1])
    else:  # stand-ins: the HAS_POOL=False branch is compiled out and never reads them
        pools, pool_args = (qkv, qkv, positions), (0, 0, 0, 0, 0, 0, 1)
    _rope_and_cache_kernel[(qkv.shape[0], num_heads + num_kv_heads)](
        qkv, positions, cos_table, sin_table, *pools,
        qkv.stride(0), cos_table.stride(0), sin_table.stride(0), *pool_args,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HALF_PAD=triton.next_power_of_2(head_dim // 2), HAS_POOL=k_pool is not None,
        RNE_BF16=_interpreted_bf16(qkv),
    )
    return views


def reference_rope_and_cache(
    qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
    sin_table: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    k_pool: torch.Tensor | None = None, v_pool: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_rope(qkv, positions, cos_table, sin_table, num_heads, num_kv_heads, head_dim,
                k_pool, v_pool, slots)
    q, k, v = _split_heads(qkv, num_heads, num_kv_heads, head_dim)
    qk = qkv.unflatten(1, (-1, head_dim))[:, : num_heads + num_kv_heads]
    cos, sin = cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)
    x1, x2 = qk.float().chunk(2, dim=-1)
    qk.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
    if k_pool is not None and v_pool is not None and slots is not None:
        keep = slots >= 0
        flat = slots[keep].long()
        block, offset = flat // k_pool.shape[1], flat % k_pool.shape[1]
        k_pool[block, offset] = k[keep]
        v_pool[block, offset] = v[keep]
    return q, k, v
