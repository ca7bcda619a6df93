"""Paged decode attention: Triton kernel vs the torch reference, and the reference vs dense SDPA.

The CPU checks run the kernels in the Triton interpreter inside one subprocess, because
TRITON_INTERPRET must be set before triton is imported and must not leak into other tests.
That subprocess (started once per session by `interpreter_errors_once`) also runs the suites
of test_triton_kernels.py, so the interpreter's start-up is paid once.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tandem.engine import triton_attention
from tandem.engine.triton_attention import (
    paged_decode_attention,
    pick_num_splits,
    reference_decode_attention,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
GARBAGE_BLOCK_ID = 1_000_000  # far outside any pool: reading it would fault or give garbage
# Each entry returns {case name: error}; a case passes when its error is within tolerance.
INTERPRETER_SUITES = ("tests.test_triton_attention:decode_errors",
                      "tests.test_triton_kernels:kernel_errors")

# name -> build_inputs kwargs (+ num_splits); the interpreter subprocess runs every case once.
CASES: dict[str, dict] = {
    "gqa3_float32": dict(heads=9, kv_heads=3, head_dim=64, lens=[7, 16, 50], dtype="float32"),
    "gqa3_bfloat16": dict(heads=9, kv_heads=3, head_dim=64, lens=[7, 16, 50], dtype="bfloat16"),
    "mha_head_dim_128": dict(heads=4, kv_heads=4, head_dim=128, lens=[5, 33], dtype="float32"),
    "mixed_lens_float32": dict(heads=9, kv_heads=3, head_dim=64, lens=[1, 15, 16, 17, 100],
                               dtype="float32"),
    "mixed_lens_bfloat16": dict(heads=9, kv_heads=3, head_dim=64, lens=[1, 15, 16, 17, 100],
                                dtype="bfloat16"),
    "mixed_lens_float16": dict(heads=8, kv_heads=2, head_dim=64, lens=[1, 15, 16, 17, 100],
                               dtype="float16"),
    "shuffled_blocks": dict(heads=9, kv_heads=3, head_dim=64, lens=[40, 70, 3], dtype="float32",
                            shuffle=True, pad_id=GARBAGE_BLOCK_ID),
    "blocks_smaller_than_tile": dict(heads=6, kv_heads=2, head_dim=64, lens=[1, 9, 30],
                                     dtype="float32", block_size=4, shuffle=True),
    "strided_views": dict(heads=9, kv_heads=3, head_dim=64, lens=[20, 45], dtype="float32",
                          strided=True, shuffle=True),
    # Split-K: splits of 16-32 tokens, so even these short contexts span several splits, and
    # context 0 (an empty shard) sits next to contexts that leave some splits empty.
    "split4_float32": dict(heads=9, kv_heads=3, head_dim=64, lens=[0, 7, 16, 50, 100],
                           dtype="float32", shuffle=True, num_splits=4),
    "split4_bfloat16": dict(heads=9, kv_heads=3, head_dim=64, lens=[0, 7, 16, 50, 100],
                            dtype="bfloat16", shuffle=True, num_splits=4),
    "split3_float16_small_blocks": dict(heads=6, kv_heads=2, head_dim=64, lens=[1, 33, 70],
                                        dtype="float16", block_size=4, num_splits=3),
    "split8_mostly_empty": dict(heads=4, kv_heads=1, head_dim=32, lens=[1, 20, 0],
                                dtype="float32", num_splits=8),
    "all_contexts_empty": dict(heads=4, kv_heads=2, head_dim=32, lens=[0, 0], dtype="float32",
                               num_splits=2),
    "seq_rows_int64_split2": dict(heads=9, kv_heads=3, head_dim=64, lens=[30, 0, 64, 9],
                                  dtype="float32", extra_rows=3, rows_dtype=torch.int64,
                                  pad_id=GARBAGE_BLOCK_ID, num_splits=2),
    "seq_rows_int32_bfloat16": dict(heads=8, kv_heads=2, head_dim=64, lens=[12, 40],
                                    dtype="bfloat16", extra_rows=2, rows_dtype=torch.int32,
                                    pad_id=GARBAGE_BLOCK_ID),
}


def build_inputs(heads: int, kv_heads: int, head_dim: int, lens: list[int], dtype: str,
                 block_size: int = 16, shuffle: bool = False, pad_id: int = 0,
                 strided: bool = False, extra_rows: int = 0,
                 rows_dtype: torch.dtype | None = None, num_splits: int | None = None,
                 device: str = "cpu", seed: int = 0) -> dict:
    """Random per-sequence K/V scattered into a block pool, plus the matching dense copies.

    With rows_dtype, sequence i uses table row seq_rows[i] of a table with extra_rows more
    rows than sequences; the unused rows hold pad_id. num_splits rides along in `splits`.
    """
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 3  # spare blocks that no table points at
    order = torch.randperm(num_blocks, generator=gen) if shuffle else torch.arange(num_blocks)
    width = max(needed) + 1
    table = torch.full((len(lens) + extra_rows, width), pad_id, dtype=torch.int32)
    rows = torch.randperm(table.shape[0], generator=gen)[: len(lens)] if rows_dtype is not None \
        else torch.arange(len(lens))
    # Layer 1 of a KVCache-shaped tensor, so the pools are views with an offset.
    data = torch.randn(2, 2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dt)
    k_pool, v_pool = data[1, 0], data[1, 1]
    dense_k, dense_v, used = [], [], 0
    for i, n in enumerate(lens):
        ids = order[used:used + needed[i]]
        used += needed[i]
        table[rows[i], : needed[i]] = ids.int()
        dense_k.append(k_pool[ids].reshape(-1, kv_heads, head_dim)[:n].clone())
        dense_v.append(v_pool[ids].reshape(-1, kv_heads, head_dim)[:n].clone())
    if strided:
        # q sliced out of a fused qkv projection: batch stride != heads * head_dim.
        qkv = torch.randn(len(lens), heads + 2 * kv_heads, head_dim, generator=gen).to(dt)
        q = qkv[:, :heads]
    else:
        q = torch.randn(len(lens), heads, head_dim, generator=gen).to(dt)
    args = dict(q=q, k_pool=k_pool, v_pool=v_pool, block_tables=table,
                context_lens=torch.tensor(lens, dtype=torch.int32), scale=head_dim ** -0.5)
    if rows_dtype is not None:
        args["seq_rows"] = rows.to(rows_dtype)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return dict(args=args, dense_k=dense_k, dense_v=dense_v, splits=num_splits)


def lse_aware_error(out: torch.Tensor, lse: torch.Tensor, want_out: torch.Tensor,
                    want_lse: torch.Tensor) -> float:
    """Max abs error over out and the finite lse; inf when NaN appears or -inf entries differ."""
    if out.isnan().any() or lse.isnan().any() or not torch.equal(lse.isinf(), want_lse.isinf()):
        return math.inf
    finite = want_lse.isfinite()
    lse_err = (lse[finite] - want_lse[finite]).abs().max().item() if finite.any() else 0.0
    return max((out.float() - want_out.float()).abs().max().item(), lse_err)


def decode_errors() -> dict[str, float]:
    """Every decode case through the kernel (out and LSE) against the torch reference."""
    errors = {}
    for name, spec in CASES.items():
        built = build_inputs(**spec)
        args = built["args"]
        out, lse = paged_decode_attention(**args, num_splits=built["splits"], return_lse=True)
        want_out, want_lse = reference_decode_attention(**args, return_lse=True)
        assert out.dtype == want_out.dtype and out.shape == want_out.shape, name
        assert lse.dtype == torch.float32 and lse.shape == want_lse.shape, name
        errors[name] = lse_aware_error(out, lse, want_out, want_lse)
    return errors


def _interpreter_main() -> None:
    """Subprocess entry point: print every suite's {case: error} as one JSON object."""
    torch.set_num_threads(1)
    errors: dict[str, float] = {}
    for entry in INTERPRETER_SUITES:
        module, function = entry.split(":")
        errors.update(getattr(importlib.import_module(module), function)())
    print(json.dumps(errors))


@functools.cache
def interpreter_errors_once() -> dict[str, float]:
    """Run the interpreter subprocess once per session; both test modules share its result."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    code = "import tests.test_triton_attention as t; t._interpreter_main()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interpreter_errors() -> dict[str, float]:
    pytest.importorskip("triton")
    return interpreter_errors_once()


def _assert_case_close(errors: dict[str, float], name: str) -> None:
    tol = TOLERANCE[CASES[name]["dtype"]]
    assert errors[name] <= tol, f"{name}: max abs error {errors[name]:.3g} > {tol}"


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(interpreter_errors, name):
    """Output and LSE of every case; the case names say what each one exercises.

    lse_aware_error is inf when a NaN appears or the -inf pattern of the LSE (empty contexts)
    differs from the reference, so "all_contexts_empty" checks zeros and -inf without NaN.
    """
    _assert_case_close(interpreter_errors, name)


@pytest.mark.parametrize("name", ["gqa3_float32", "mixed_lens_float32", "shuffled_blocks",
                                  "mha_head_dim_128", "blocks_smaller_than_tile",
                                  "seq_rows_int64_split2"])
def test_reference_matches_dense_sdpa(name):
    built = build_inputs(**CASES[name])
    args = built["args"]
    got, lse = reference_decode_attention(**args, return_lse=True)
    for i, (k, v) in enumerate(zip(built["dense_k"], built["dense_v"], strict=True)):
        if k.shape[0] == 0:  # an empty context: SDPA has nothing to attend to
            assert not got[i].any() and lse[i].eq(float("-inf")).all()
            continue
        # SDPA wants [batch, heads, tokens, head_dim]; one query token per sequence.
        q = args["q"][i].unsqueeze(0).unsqueeze(2)
        want = F.scaled_dot_product_attention(
            q, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
            scale=args["scale"], enable_gqa=True,
        )
        torch.testing.assert_close(got[i], want[0, :, 0], atol=1e-5, rtol=1e-5)
        group = q.shape[1] // k.shape[1]
        scores = torch.einsum("hd,nhd->hn", args["q"][i], k.repeat_interleave(group, dim=1))
        torch.testing.assert_close(lse[i], (scores * args["scale"]).logsumexp(-1))


def test_reference_accepts_fewer_table_rows_than_sequences_with_seq_rows():
    args = build_inputs(**CASES["gqa3_float32"])["args"]
    want = reference_decode_attention(**args)
    # Every sequence reads row 0 of a one-row table: the result is row 0's attention for all.
    shared = dict(args, block_tables=args["block_tables"][:1],
                  context_lens=args["context_lens"][:1].expand(3).contiguous(),
                  seq_rows=torch.zeros(3, dtype=torch.int64))
    got = reference_decode_attention(**dict(shared, q=args["q"][:1].expand(3, -1, -1)))
    torch.testing.assert_close(got, want[:1].expand(3, -1, -1))


def test_split_heuristic_uses_only_host_shapes(monkeypatch):
    assert pick_num_splits(1, 8, 32768, torch.device("cpu")) == 1  # interpreter: no splits
    props = type("Props", (), {"multi_processor_count": 132})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cuda = torch.device("cuda")
    assert pick_num_splits(1, 8, 32768, cuda) == triton_attention.MAX_SPLITS
    assert pick_num_splits(4, 8, 32768, cuda) == 9  # ceil(2 * 132 / 32): two waves of SMs
    assert pick_num_splits(1, 8, 1024, cuda) == 4  # no split under MIN_SPLIT_TOKENS
    assert pick_num_splits(64, 8, 32768, cuda) == 1  # the batch alone fills the GPU
    assert pick_num_splits(1, 8, 100, cuda) == 1


def test_reference_keeps_query_dtype():
    args = build_inputs(**CASES["gqa3_bfloat16"])["args"]
    assert reference_decode_attention(**args).dtype == torch.bfloat16


@pytest.mark.parametrize(("field", "bad", "match"), [
    ("block_tables", lambda a: a["block_tables"].long(), "block_tables must be int32"),
    ("context_lens", lambda a: a["context_lens"].long(), "context_lens must be int32"),
    ("context_lens", lambda a: a["context_lens"][:1], "context_lens must be"),
    ("block_tables", lambda a: a["block_tables"][:1], "block_tables must be"),
    ("k_pool", lambda a: a["k_pool"].half(), "k_pool has dtype"),
    ("v_pool", lambda a: a["v_pool"][..., :32], "v_pool shape"),
    ("q", lambda a: a["q"][0], "q must be"),
    ("q", lambda a: a["q"][:, :8], "num_heads 8 not a multiple"),
    ("seq_rows", lambda a: torch.zeros(2, dtype=torch.int32), "seq_rows must be"),
    ("seq_rows", lambda a: torch.zeros(3, dtype=torch.int16), "seq_rows must be int32"),
    ("num_splits", lambda a: 0, "num_splits must be >= 1"),
], ids=["int64_table", "int64_lens", "short_lens", "short_table", "pool_dtype", "pool_shape",
        "q_rank", "head_ratio", "seq_rows_shape", "seq_rows_dtype", "zero_splits"])
def test_invalid_inputs_raise_value_error_naming_the_argument(field, bad, match):
    pytest.importorskip("triton")
    args = build_inputs(**CASES["gqa3_float32"])["args"]
    args[field] = bad(args)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(**args)


def test_non_power_of_two_block_size_is_rejected():
    pytest.importorskip("triton")
    args = build_inputs(**CASES["gqa3_float32"])["args"]
    args["k_pool"] = args["k_pool"][:, :12]
    args["v_pool"] = args["v_pool"][:, :12]
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        paged_decode_attention(**args)


def test_missing_triton_raises_runtime_error(monkeypatch):
    monkeypatch.setattr(triton_attention, "HAS_TRITON", False)
    args = build_inputs(**CASES["gqa3_float32"])["args"]
    with pytest.raises(RuntimeError, match="needs triton"):
        paged_decode_attention(**args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_kernel_matches_reference_on_cuda(dtype):
    pytest.importorskip("triton")
    lens = [0, 1, 15, 16, 17, 100, 1000, 4097]
    for heads, kv_heads, head_dim in [(9, 3, 64), (32, 8, 128), (8, 8, 64)]:
        built = build_inputs(heads=heads, kv_heads=kv_heads, head_dim=head_dim, lens=lens,
                             dtype=dtype, shuffle=True, extra_rows=2, rows_dtype=torch.int64,
                             device="cuda")
        args = built["args"]
        want_out, want_lse = reference_decode_attention(**args, return_lse=True)
        for splits in (None, 1, 4, 16):
            out, lse = paged_decode_attention(**args, num_splits=splits, return_lse=True)
            err = lse_aware_error(out, lse, want_out, want_lse)
            assert err <= TOLERANCE[dtype], f"{heads}/{kv_heads}/{head_dim} splits={splits}: " \
                f"max abs error {err:.3g}"
