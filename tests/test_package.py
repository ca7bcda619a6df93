"""Packaging, the lazy top-level API, loader errors and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tandem.engine.errors import ModelLoadError
from tandem.engine.loader import load_model


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_import_tandem_does_not_import_torch():
    res = run_python("import sys, tandem; assert 'torch' not in sys.modules, 'torch'; "
                     "print(tandem.__version__)")
    assert res.returncode == 0, res.stderr


def test_llm_and_sampling_params_resolve_lazily():
    res = run_python("import sys, tandem; from tandem import SamplingParams, LLM; "
                     "assert LLM.__name__ == 'LLM'; assert 'torch' in sys.modules")
    assert res.returncode == 0, res.stderr
    import tandem

    with pytest.raises(AttributeError, match="nope"):
        _ = tandem.nope


@pytest.mark.parametrize(("make", "match"), [
    (lambda d: str(d / "missing"), "does not exist"),
    (lambda d: str(d), "neither a .gguf file nor a Hugging Face directory"),
    (lambda d: (d / "x.gguf").write_bytes(b"not a gguf") and str(d / "x.gguf"),
     "not a readable GGUF"),
])
def test_bad_model_paths_get_a_one_line_error(tmp_path: Path, make, match):
    import torch

    with pytest.raises(ModelLoadError, match=match) as err:
        load_model(make(tmp_path), torch.float32, torch.device("cpu"))
    assert "\n" not in str(err.value)


def test_cli_generate_prints_only_the_completion(loaded_bf16):
    from tandem import LLM, SamplingParams

    res = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "generate", "The sky is", "--max-tokens", "8",
         "--temperature", "0", "--threads", "1"],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    llm = LLM(kv_cache_gb=0.05)
    want = llm.generate("The sky is", SamplingParams(max_tokens=8, temperature=0))[0].text
    assert res.stdout == want + "\n"


def test_cli_reports_a_bad_model_in_one_line(tmp_path: Path):
    res = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "generate", "hi", "--model", str(tmp_path / "no")],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: model path") and res.stdout == ""
