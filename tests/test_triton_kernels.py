"""Paged prefill attention and the fused elementwise ops: Triton kernels vs torch references.

The interpreter checks run in the single subprocess that test_triton_attention starts (see
INTERPRETER_SUITES there); `kernel_errors` is this module's entry point into it.
"""

from __future__ import annotations

from itertools import accumulate

import pytest
import torch
import torch.nn.functional as F

from tandem.engine import triton_ops, triton_prefill
from tandem.engine.model import RMSNorm
from tandem.engine.rotary import RotaryEmbedding, rotate
from tandem.engine.triton_prefill import paged_prefill_attention, reference_prefill_attention
from tests.test_triton_attention import (
    DTYPES,
    GARBAGE_BLOCK_ID,
    TOLERANCE,
    interpreter_errors_once,
)

# (new tokens, cached tokens) per chunk: one cached and one fresh chunk at least, and an empty
# chunk whose tiles must all exit.
CHUNKS = [(5, 0), (20, 30), (1, 16), (0, 9), (17, 0)]
PREFILL_CASES: dict[str, dict] = {
    "prefill_gqa3_float32": dict(heads=6, kv_heads=2, head_dim=64, chunks=CHUNKS,
                                 dtype="float32"),
    "prefill_gqa3_bfloat16": dict(heads=6, kv_heads=2, head_dim=64, chunks=CHUNKS,
                                  dtype="bfloat16"),
    "prefill_small_blocks_strided_q": dict(heads=4, kv_heads=4, head_dim=32,
                                           chunks=[(9, 3), (3, 0)], dtype="float32",
                                           block_size=4, strided=True),
}
# Fused ops: error = max |got - want| / (1 + |want|). The kernels round exactly like the
# references; only exp may differ by an fp32 ulp, which can flip one bf16 rounding.
OP_TOLERANCE = {"float32": 1e-6, "bfloat16": 1e-2}
OPS = ["rms_norm", "add_rms_norm", "silu_and_mul", "rope_and_cache", "rope_no_cache"]


def build_prefill(heads: int, kv_heads: int, head_dim: int, chunks: list[tuple[int, int]],
                  dtype: str, block_size: int = 16, strided: bool = False,
                  device: str = "cpu", seed: int = 0) -> dict:
    """Chunks' K/V (cached context and new tokens alike) scattered over shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    lens = [new + cached for new, cached in chunks]
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 2
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(chunks), max(needed) + 1), GARBAGE_BLOCK_ID, dtype=torch.int32)
    for s, ids in enumerate(order[: sum(needed)].split(needed)):
        table[s, : needed[s]] = ids.int()
    data = torch.randn(2, 2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dt)
    total = sum(new for new, _ in chunks)
    if strided:  # q sliced out of a fused qkv projection
        q = torch.randn(total, heads + 2 * kv_heads, head_dim, generator=gen).to(dt)[:, :heads]
    else:
        q = torch.randn(total, heads, head_dim, generator=gen).to(dt)
    starts = list(accumulate((new for new, _ in chunks), initial=0))
    args = dict(q=q, k_pool=data[1, 0], v_pool=data[1, 1], block_tables=table,
                query_starts=torch.tensor(starts, dtype=torch.int32),
                context_lens=torch.tensor(lens, dtype=torch.int32), scale=head_dim ** -0.5,
                # Past the longest chunk: whole query tiles that must exit without writing.
                max_query_len=max(new for new, _ in chunks) + 16)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _op_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape or got.dtype != want.dtype:
        return float("inf")
    diff = (got.float() - want.float()).abs() / (1 + want.float().abs())
    return diff.max().item() if diff.numel() else 0.0


def _randn(gen: torch.Generator, dt: torch.dtype, device: str, *shape: int) -> torch.Tensor:
    """Seeded on the CPU generator whatever the device, so CPU and CUDA runs see equal data."""
    return torch.randn(*shape, generator=gen).to(dt).to(device)


def _rope_inputs(dt: torch.dtype, head_dim: int, with_cache: bool, gen: torch.Generator,
                 device: str = "cpu") -> dict:
    heads, kv_heads, tokens = 4, 2, 6
    width = (heads + 2 * kv_heads) * head_dim
    # Rows wider than the projection: qkv is a row-strided view, as a slice of a bigger buffer.
    qkv = _randn(gen, dt, device, tokens, width + 8)[:, :width]
    cos, sin = RotaryEmbedding(head_dim, 64, 10000.0, None).tables(torch.device(device))
    positions = torch.tensor([0, 3, 63, 1, 17, 40], device=device)
    args = dict(qkv=qkv, positions=positions, cos_table=cos, sin_table=sin, num_heads=heads,
                num_kv_heads=kv_heads, head_dim=head_dim)
    if with_cache:
        # Layer 1 of a KVCache-shaped tensor: the pools are strided views with an offset.
        data = _randn(gen, dt, device, 2, 2, 4, 4, kv_heads, head_dim)
        # Slot -1 is a padding token: nothing may be written for it.
        args.update(k_pool=data[1, 0], v_pool=data[1, 1],
                    slots=torch.tensor([5, -1, 12, 0, 15, 6], device=device))
    return args


def _clone_rope_args(args: dict) -> tuple[dict, torch.Tensor | None]:
    """A deep copy (pools still views into one copied base) and that base, for comparing."""
    out = dict(args, qkv=args["qkv"].clone())
    if "k_pool" not in args:
        return out, None
    base = args["k_pool"]._base.clone()
    out.update(k_pool=base[1, 0], v_pool=base[1, 1])
    return out, base


def op_errors(dtype: str, device: str = "cpu") -> dict[str, float]:
    gen = torch.Generator().manual_seed(1)
    dt = DTYPES[dtype]
    x = _randn(gen, dt, device, 5, 128)[:, :96]  # row-strided, width not a power of two
    residual = _randn(gen, dt, device, 5, 96)
    weight = 1 + 0.1 * _randn(gen, dt, device, 96)
    got, summed = triton_ops.add_rms_norm(x, residual, weight, 1e-6)
    want, want_summed = triton_ops.reference_add_rms_norm(x, residual, weight, 1e-6)
    gate_up = 4 * _randn(gen, dt, device, 3, 2 * 1100)  # two column blocks
    errors = {
        "rms_norm": _op_error(triton_ops.rms_norm(x, weight, 1e-5),
                              triton_ops.reference_rms_norm(x, weight, 1e-5)),
        "add_rms_norm": max(_op_error(got, want), _op_error(summed, want_summed)),
        "silu_and_mul": _op_error(triton_ops.silu_and_mul(gate_up),
                                  triton_ops.reference_silu_and_mul(gate_up)),
    }
    for name, head_dim, with_cache in (("rope_and_cache", 32, True), ("rope_no_cache", 24, False)):
        args = _rope_inputs(dt, head_dim, with_cache, gen, device)
        ref_args, ref_base = _clone_rope_args(args)
        q, _, v = triton_ops.rope_and_cache(**args)
        triton_ops.reference_rope_and_cache(**ref_args)
        err = _op_error(args["qkv"], ref_args["qkv"])
        if ref_base is not None:
            err = max(err, _op_error(args["k_pool"]._base, ref_base))
        aliased = q.data_ptr() == args["qkv"].data_ptr() and v._base is args["qkv"]._base
        errors[name] = err if aliased else float("inf")
    return {f"{name}_{dtype}": err for name, err in errors.items()}


def kernel_errors() -> dict[str, float]:
    """Interpreter entry point: every prefill case and every fused op, by name."""
    errors = {}
    for name, spec in PREFILL_CASES.items():
        args = build_prefill(**spec)
        got = paged_prefill_attention(**args)
        want = reference_prefill_attention(**args)
        errors[name] = (got.float() - want.float()).abs().max().item()
    for dtype in OP_TOLERANCE:
        errors.update(op_errors(dtype))
    return errors


@pytest.fixture(scope="module")
def interpreter_errors() -> dict[str, float]:
    pytest.importorskip("triton")
    return interpreter_errors_once()


@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_prefill_kernel_matches_reference(interpreter_errors, name):
    tol = TOLERANCE[PREFILL_CASES[name]["dtype"]]
    assert interpreter_errors[name] <= tol, f"{name}: error {interpreter_errors[name]:.3g}"


@pytest.mark.parametrize("dtype", list(OP_TOLERANCE))
@pytest.mark.parametrize("op", OPS)
def test_fused_op_matches_reference(interpreter_errors, op, dtype):
    err = interpreter_errors[f"{op}_{dtype}"]
    assert err <= OP_TOLERANCE[dtype], f"{op} {dtype}: error {err:.3g}"


@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_prefill_reference_matches_dense_causal_sdpa(name):
    spec = PREFILL_CASES[name]
    args = build_prefill(**spec)
    got = reference_prefill_attention(**args)
    starts, lens = args["query_starts"].tolist(), args["context_lens"].tolist()
    for s, n in enumerate(lens):
        lo, hi = starts[s], starts[s + 1]
        ids = args["block_tables"][s, : -(-n // args["k_pool"].shape[1])].long()
        k = args["k_pool"][ids].flatten(0, 1)[:n].transpose(0, 1).float()  # [Hkv, n, D]
        v = args["v_pool"][ids].flatten(0, 1)[:n].transpose(0, 1).float()
        # Query i sits at position n - (hi - lo) + i: a causal mask shifted by the cache.
        mask = torch.ones(hi - lo, n, dtype=torch.bool).tril(diagonal=n - (hi - lo))
        want = F.scaled_dot_product_attention(args["q"][lo:hi].transpose(0, 1).float(), k, v,
                                              attn_mask=mask, scale=args["scale"],
                                              enable_gqa=True)
        tol = TOLERANCE[spec["dtype"]]
        torch.testing.assert_close(got[lo:hi].float(), want.transpose(0, 1), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_match_the_model_code(dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 64, generator=gen).to(dtype)
    norm = RMSNorm(64, 1e-5).to(dtype)
    norm.weight.data.normal_(1, 0.1, generator=gen)
    with torch.no_grad():
        assert torch.equal(triton_ops.reference_rms_norm(x, norm.weight, 1e-5), norm(x))
        gate_up = torch.randn(4, 2 * 48, generator=gen).to(dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        assert torch.equal(triton_ops.reference_silu_and_mul(gate_up), F.silu(gate) * up)
    if dtype == torch.float32:  # the model's rotate works in the serving dtype; fp32 is exact
        args = _rope_inputs(dtype, 32, False, gen)
        rope = RotaryEmbedding(32, 64, 10000.0, None)
        heads = args["qkv"].unflatten(1, (-1, 32))[:, :6]
        want = rotate(heads, rope.lookup(args["positions"], dtype))
        q, k, _ = triton_ops.reference_rope_and_cache(**args)
        assert torch.equal(torch.cat((q, k), dim=1), want)


@pytest.mark.parametrize(("call", "match"), [
    (lambda x, w: triton_ops.rms_norm(x, w.half(), 1e-6), "weight must be"),
    (lambda x, w: triton_ops.rms_norm(x[None], w, 1e-6), "x must have 2 dims"),
    (lambda x, w: triton_ops.rms_norm(x.t(), w, 1e-6), "contiguous in its last dim"),
    (lambda x, w: triton_ops.add_rms_norm(x, x[:2], w, 1e-6), "residual must be"),
    (lambda x, w: triton_ops.silu_and_mul(x[:, :5]), "odd width"),
], ids=["weight_dtype", "x_rank", "x_stride", "residual_shape", "odd_gate_up"])
def test_invalid_norm_and_mlp_inputs_raise(call, match):
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match=match):
        call(torch.randn(3, 8), torch.ones(8))


@pytest.mark.parametrize(("change", "match"), [
    (lambda a: dict(a, qkv=a["qkv"][:, :-32]), "qkv must be"),
    (lambda a: dict(a, slots=None), "given together"),
    (lambda a: dict(a, cos_table=a["cos_table"].double()), "cos_table must be float32"),
    (lambda a: dict(a, positions=a["positions"][:2]), "positions must be"),
    (lambda a: dict(a, slots=a["slots"].float()), "slots must be"),
    (lambda a: dict(a, v_pool=a["v_pool"].half()), "v_pool must be"),
], ids=["qkv_width", "pools_without_slots", "table_dtype", "positions_shape", "slots_dtype",
        "pool_dtype"])
def test_invalid_rope_inputs_raise(change, match):
    pytest.importorskip("triton")
    args = change(_rope_inputs(torch.float32, 32, True, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=match):
        triton_ops.rope_and_cache(**args)


@pytest.mark.parametrize(("field", "bad", "match"), [
    ("query_starts", lambda a: a["query_starts"].long(), "query_starts must be int32"),
    ("block_tables", lambda a: a["block_tables"][:2], "block_tables must be"),
    ("context_lens", lambda a: a["context_lens"][:2], "context_lens must be"),
    ("max_query_len", lambda a: -1, "max_query_len must be"),
    ("k_pool", lambda a: a["k_pool"][:, :12], "block_size must be a power of two"),
    ("v_pool", lambda a: a["v_pool"].double(), "v_pool has dtype"),
], ids=["int64_starts", "short_table", "short_lens", "negative_max", "block_size", "pool_dtype"])
def test_invalid_prefill_inputs_raise(field, bad, match):
    pytest.importorskip("triton")
    args = build_prefill(**PREFILL_CASES["prefill_gqa3_float32"])
    args[field] = bad(args)
    if field == "k_pool":
        args["v_pool"] = args["v_pool"][:, :12]
    with pytest.raises(ValueError, match=match):
        paged_prefill_attention(**args)


def test_missing_triton_raises_runtime_error(monkeypatch):
    monkeypatch.setattr(triton_ops, "HAS_TRITON", False)
    monkeypatch.setattr(triton_prefill, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="needs triton"):
        triton_ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="needs triton"):
        paged_prefill_attention(**build_prefill(**PREFILL_CASES["prefill_gqa3_float32"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_prefill_kernel_matches_reference_on_cuda(dtype):
    pytest.importorskip("triton")
    chunks = [(1, 0), (300, 0), (77, 1000), (128, 2048), (0, 5), (64, 63)]
    for heads, kv_heads, head_dim in [(6, 2, 64), (32, 8, 128)]:
        args = build_prefill(heads=heads, kv_heads=kv_heads, head_dim=head_dim, chunks=chunks,
                             dtype=dtype, device="cuda")
        err = (paged_prefill_attention(**args).float()
               - reference_prefill_attention(**args).float()).abs().max().item()
        assert err <= TOLERANCE[dtype], f"{heads}/{kv_heads}/{head_dim}: error {err:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_ops_match_references_on_cuda():
    pytest.importorskip("triton")
    # The interpreter suite's inputs on CUDA. GPU exp, sqrt and FMA contraction may each move
    # a result by an ulp, hence the looser fp32 bound.
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 1e-2), ("float16", 5e-3)):
        for name, err in op_errors(dtype, "cuda").items():
            assert err <= tol, f"{name}: error {err:.3g}"
