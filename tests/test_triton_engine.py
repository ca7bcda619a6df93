"""The whole CUDA compute path on CPU: the engine under the Triton interpreter (fused norms,
RoPE with the cache write, SiLU-and-mul, the paged prefill kernel over chunked prefills with
cached context, flash-decoding over device-resident block tables with padded rows) gives the
same fp32 greedy tokens and logits as the torch path. A tiny random-weight model keeps the
interpreter to a few seconds; it runs in a subprocess because TRITON_INTERPRET must be set
before triton is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)


def run_engine(model: Path) -> dict:
    """Greedy tokens of three prompts (chunked prefill, padded decode) and one prompt's logits."""
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import LLMEngine
    from tandem.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(model), dtype="float32", device="cpu",
                                    kv_cache_gb=0.05, max_model_len=256, max_num_seqs=8,
                                    max_num_batched_tokens=16))
    engine.runner.pad_to_buckets = True
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (5, 21, 9)]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=6, temperature=0,
                                                           ignore_eos=True))
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    return {"tokens": [done[f"r{i}"] for i in range(3)],
            "logits": engine.score(prompts[1]).tolist(),
            "triton": engine.runner.use_triton}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from .test_gpu_engine import build_model

    return build_model(tmp_path_factory.mktemp("tiny"), TINY, std=0.3)


def test_the_triton_path_gives_the_torch_paths_tokens_and_logits(tiny_model):
    reference = run_engine(tiny_model)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, str(tiny_model)], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    interpreted = json.loads(done.stdout.strip().splitlines()[-1])
    assert interpreted["triton"] and not reference["triton"]
    assert interpreted["tokens"] == reference["tokens"]
    diff = (torch.tensor(interpreted["logits"]) - torch.tensor(reference["logits"])).abs()
    assert diff.max().item() < 1e-4


if __name__ == "__main__":  # the interpreter subprocess
    print(json.dumps(run_engine(Path(sys.argv[1]))))
