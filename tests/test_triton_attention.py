"""Paged decode attention: Triton kernel vs the torch reference, and the reference vs dense SDPA.

The CPU checks run the kernel in the Triton interpreter inside one subprocess, because
TRITON_INTERPRET must be set before triton is imported and must not leak into other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tandem.engine import triton_attention
from tandem.engine.triton_attention import paged_decode_attention, reference_decode_attention

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
GARBAGE_BLOCK_ID = 1_000_000  # far outside any pool: reading it would fault or give garbage

# name -> build_inputs kwargs; the interpreter subprocess runs every case once.
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
}


def build_inputs(heads: int, kv_heads: int, head_dim: int, lens: list[int], dtype: str,
                 block_size: int = 16, shuffle: bool = False, pad_id: int = 0,
                 strided: bool = False, device: str = "cpu", seed: int = 0) -> dict:
    """Random per-sequence K/V scattered into a block pool, plus the matching dense copies."""
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 3  # spare blocks that no table points at
    order = torch.randperm(num_blocks, generator=gen) if shuffle else torch.arange(num_blocks)
    width = max(needed) + 1
    table = torch.full((len(lens), width), pad_id, dtype=torch.int32)
    # Layer 1 of a KVCache-shaped tensor, so the pools are views with an offset.
    data = torch.randn(2, 2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dt)
    k_pool, v_pool = data[1, 0], data[1, 1]
    dense_k, dense_v, used = [], [], 0
    for i, n in enumerate(lens):
        ids = order[used:used + needed[i]]
        used += needed[i]
        table[i, : needed[i]] = ids.int()
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
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return dict(args=args, dense_k=dense_k, dense_v=dense_v)


def _interpreter_main() -> None:
    """Subprocess entry point: print each case's max |kernel - reference| as JSON."""
    torch.set_num_threads(1)
    errors = {}
    for name, spec in CASES.items():
        args = build_inputs(**spec)["args"]
        got = paged_decode_attention(**args)
        want = reference_decode_attention(**args)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        errors[name] = (got.float() - want.float()).abs().max().item()
    print(json.dumps(errors))


@pytest.fixture(scope="module")
def interpreter_errors() -> dict[str, float]:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "import test_triton_attention as t; t._interpreter_main()")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_case_close(errors: dict[str, float], name: str) -> None:
    tol = TOLERANCE[CASES[name]["dtype"]]
    assert errors[name] <= tol, f"{name}: max abs error {errors[name]:.3g} > {tol}"


@pytest.mark.parametrize("name", ["gqa3_float32", "gqa3_bfloat16"])
def test_kernel_matches_reference_for_gqa_ratio_3(interpreter_errors, name):
    _assert_case_close(interpreter_errors, name)


def test_kernel_matches_reference_without_grouping_at_head_dim_128(interpreter_errors):
    _assert_case_close(interpreter_errors, "mha_head_dim_128")


@pytest.mark.parametrize("name", ["mixed_lens_float32", "mixed_lens_bfloat16",
                                  "mixed_lens_float16"])
def test_kernel_matches_reference_for_mixed_context_lengths(interpreter_errors, name):
    _assert_case_close(interpreter_errors, name)


def test_kernel_follows_shuffled_block_ids_and_ignores_table_padding(interpreter_errors):
    _assert_case_close(interpreter_errors, "shuffled_blocks")


def test_kernel_handles_several_blocks_per_tile(interpreter_errors):
    _assert_case_close(interpreter_errors, "blocks_smaller_than_tile")


def test_kernel_accepts_strided_query_and_pool_views(interpreter_errors):
    _assert_case_close(interpreter_errors, "strided_views")


@pytest.mark.parametrize("name", ["gqa3_float32", "mixed_lens_float32", "shuffled_blocks",
                                  "mha_head_dim_128", "blocks_smaller_than_tile"])
def test_reference_matches_dense_sdpa(name):
    built = build_inputs(**CASES[name])
    args = built["args"]
    got = reference_decode_attention(**args)
    for i, (k, v) in enumerate(zip(built["dense_k"], built["dense_v"], strict=True)):
        # SDPA wants [batch, heads, tokens, head_dim]; one query token per sequence.
        q = args["q"][i].unsqueeze(0).unsqueeze(2)
        want = F.scaled_dot_product_attention(
            q, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
            scale=args["scale"], enable_gqa=True,
        )
        torch.testing.assert_close(got[i], want[0, :, 0], atol=1e-5, rtol=1e-5)


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
], ids=["int64_table", "int64_lens", "short_lens", "short_table", "pool_dtype", "pool_shape",
        "q_rank", "head_ratio"])
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
    lens = [1, 15, 16, 17, 100, 1000, 4097]
    for heads, kv_heads, head_dim in [(9, 3, 64), (32, 8, 128), (8, 8, 64)]:
        args = build_inputs(heads=heads, kv_heads=kv_heads, head_dim=head_dim, lens=lens,
                            dtype=dtype, shuffle=True, device="cuda")["args"]
        got = paged_decode_attention(**args)
        want = reference_decode_attention(**args)
        err = (got.float() - want.float()).abs().max().item()
        assert err <= TOLERANCE[dtype], f"{heads}/{kv_heads}/{head_dim}: max abs error {err:.3g}"
