"""bench/gpu.py's CPU smoke run, as CI executes it: the tiny random-weight shape, both systems,
every measurement, the JSON summary and the per-shape file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The smoke run's JSON summary and its --out folder; the tokenizer goes through its own
    export command first, as it would to a GPU machine."""
    tmp = tmp_path_factory.mktemp("bench-gpu")
    exported = run_bench("--export-tokenizer", str(tmp / "tokenizer"))
    assert exported.returncode == 0, exported.stderr
    res = run_bench("--shapes", "tiny", "--device", "cpu", "--json", "--out", str(tmp / "out"),
                    "--tokenizer", str(tmp / "tokenizer"), "--model-cache", str(tmp / "models"))
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), tmp


def test_tokenizer_export_writes_the_files_tandem_loads(smoke):
    _, tmp = smoke
    config = json.loads((tmp / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["eos_token"] and (tmp / "tokenizer" / "tokenizer.json").is_file()
    model_dir = next((tmp / "models").iterdir())
    assert (model_dir / "tokenizer.json").is_file() and (model_dir / "config.json").is_file()


def test_both_systems_decode_and_prefill(smoke):
    summary, _ = smoke
    tiny = summary["shapes"]["tiny"]
    assert "error" not in tiny
    for system in ("tandem", "hf"):
        for batch in (1, 2):
            assert tiny[system]["decode_tok_s"][f"b{batch}"] > 0, (system, batch)
            assert tiny[f"{system}_decode_tok_s_b{batch}"] > 0
        assert tiny[system]["prefill_tok_s"] > 0
    assert tiny["decode_b2_vs_hf"] > 0 and tiny["prefill_vs_hf"] > 0
    assert tiny["hf"]["attention"] == "sdpa" and tiny["hf_static"] is None
    assert tiny["tandem"]["max_num_seqs"] == 256
    assert tiny["tandem"]["max_num_batched_tokens"] >= 16384


def test_roofline_counts_the_tied_head_once_and_no_separate_embedding(smoke):
    summary, _ = smoke
    tiny = summary["shapes"]["tiny"]
    c = tiny["config"]
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    qkv = h * (c["num_heads"] + 2 * c["num_kv_heads"]) * d
    per_layer = qkv + c["num_heads"] * d * h + 3 * h * i + 2 * h
    params = c["num_layers"] * per_layer + h + c["vocab_size"] * h  # final norm, tied head
    assert tiny["decode_read_bytes"] == 2 * params  # bfloat16
    assert summary["memory_read_gbps"] > 0
    assert tiny["roofline_decode_tok_s_b1"] == pytest.approx(
        summary["memory_read_gbps"] * 1e9 / tiny["decode_read_bytes"])


def test_cpu_profile_is_labelled_and_gpu_fields_are_null(smoke):
    summary, _ = smoke
    profile = summary["shapes"]["tiny"]["profile_b1"]
    assert profile["steps"] >= 32 and profile["cpu_ops_per_step"] > 0
    assert profile["kernels_per_step"] is None and profile["gpu_busy"] is None
    assert summary["shapes"]["tiny"]["gpu_busy_b1"] is None


def test_float32_parity_with_transformers(smoke):
    summary, _ = smoke
    tiny = summary["shapes"]["tiny"]
    assert tiny["logits_max_abs_diff_fp32"] < 1e-3
    assert tiny["parity_fp32"]["logits_max_abs"] > 0.1  # the logits are not all ~0
    assert tiny["greedy_tokens_total_fp32"] > 0
    assert tiny["greedy_tokens_matching_fp32"] == tiny["greedy_tokens_total_fp32"]
    assert tiny["greedy_equal_fp32"] is True


def test_the_shape_file_holds_the_same_report(smoke):
    summary, tmp = smoke
    written = json.loads((tmp / "out" / "tiny.json").read_text())
    assert written == summary["shapes"]["tiny"]
