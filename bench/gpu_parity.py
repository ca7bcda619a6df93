"""Float32 parity of bench/gpu.py: both systems reload the shape's directory in float32 with TF32
off and see the same prompts. Reported: the max |difference| of the teacher-forced logits of one
prompt (Tandem `engine.score`, transformers `model(ids).logits`) and how many leading greedy
tokens agree (Tandem `generate`, transformers `generate`, EOS ignored)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from gpu_measure import free_memory  # bench/gpu_measure.py, next to this script
from gpu_models import Shape, log, make_prompts
from gpu_systems import SEED, Settings, hf_runner, load_hf, load_tandem, tandem_runner


@contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off for cuBLAS and cuDNN (a 10-bit mantissa would dominate the difference)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def hf_parity(model_dir: Path, prompts: list[list[int]], tokens: int,
              device: torch.device) -> tuple[torch.Tensor, list[list[int]]]:
    model = load_hf(model_dir, torch.float32, device)
    with torch.inference_mode():
        logits = model(torch.tensor(prompts[:1], device=device)).logits[0].float().cpu()
    generated = hf_runner(model, prompts, "hf fp32 greedy", device, static=False)(tokens)[1]
    return logits, generated


def tandem_parity(model_dir: Path, shape: Shape, prompts: list[list[int]], tokens: int,
                  s: Settings) -> tuple[torch.Tensor, list[list[int]]]:
    # max_num_seqs = the prompts: only the graphs this batch uses are captured, in float32.
    llm = load_tandem(model_dir, shape, s, "float32", len(prompts), 2048)
    logits = llm.engine.score(prompts[0])
    generated = tandem_runner(llm, prompts, "tandem fp32 greedy", s.device)(tokens)[1]
    return logits, generated


def run_parity(model_dir: Path, shape: Shape, s: Settings) -> dict[str, Any]:
    """Both systems in float32 on the same prompts: the max |difference| of the teacher-forced
    logits of the first prompt, and how many leading greedy tokens agree."""
    log(f"{shape.name}: float32 parity, {s.parity_prompts} prompts of {s.parity_len} tokens")
    prompts = make_prompts(shape.vocab_size, s.parity_prompts, s.parity_len, SEED + 2)
    with exact_float32():
        hf_logits, hf_tokens = hf_parity(model_dir, prompts, s.parity_tokens, s.device)
        free_memory(s.device, "hf fp32")
        ours, our_tokens = tandem_parity(model_dir, shape, prompts, s.parity_tokens, s)
        free_memory(s.device, "tandem fp32")
    matching = sum(_leading_matches(a, b) for a, b in zip(our_tokens, hf_tokens, strict=True))
    total = s.parity_prompts * s.parity_tokens
    result = {"logits_max_abs_diff": (ours - hf_logits).abs().max().item(),
              "logits_max_abs": hf_logits.abs().max().item(), "logits_prompt_len": s.parity_len,
              "greedy_tokens_matching": matching, "greedy_tokens_total": total,
              "greedy_equal": matching == total}
    log(f"  {result}")
    return result


def _leading_matches(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count
