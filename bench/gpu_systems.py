"""The two systems of bench/gpu.py, each loaded, measured and freed in one function call (its
frame holds the only reference, so the next system loads onto an empty device): Tandem's speed
and its profiled batch-1 decode, and transformers' speed (eager, or compiled with a static
cache). Their float32 parity is in bench/gpu_parity.py."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from gpu_measure import (  # bench/gpu_measure.py, next to this script
    Runner,
    check_lengths,
    decode_rate,
    prefill_rate,
    prepare_profiler_for_graphs,
    profile_steps,
    timed,
)
from gpu_models import Shape, decode_read_bytes, log, make_prompts

from tandem.engine.llm import LLM
from tandem.engine.sampling_params import SamplingParams

SEED = 1234
WARMUP_TOKENS = 4  # one short generate per batch size first: Triton, cuBLAS and caches warm up
PROFILE_WARMUP_STEPS = 4
MAX_NUM_SEQS = 256
MIN_BATCHED_TOKENS = 16384
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Settings:
    """What one run measures, shared by every shape (see bench/gpu.py's options)."""

    device: torch.device
    dtype: str
    batches: list[int]
    prompt_len: int
    decode_tokens: int
    prefill_prompts: int
    prefill_len: int
    repeats: int
    profile_steps: int
    parity_prompts: int
    parity_len: int
    parity_tokens: int
    cuda_graphs: bool
    kv_cache_gb: float | None

    def max_model_len(self, shape: Shape) -> int:
        """Tandem's max_model_len: the shape's, or longer where a test needs more."""
        needed = max(self.prefill_len, self.prompt_len + self.decode_tokens + 1,
                     self.parity_len + self.parity_tokens, self.prompt_len + PROFILE_WARMUP_STEPS
                     + self.profile_steps + 2) + 1
        return min(max(shape.max_model_len, needed), shape.max_position_embeddings)


@dataclass
class SystemRun:
    """One system's throughputs (tok/s; decode keyed by batch size) and facts about it."""

    decode: dict[int, float] = field(default_factory=dict)
    prefill: float | None = None
    per_repeat: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"decode_tok_s": {f"b{b}": rate for b, rate in self.decode.items()},
                "prefill_tok_s": self.prefill,
                "per_repeat_tok_s": {k: [round(r, 2) for r in v]
                                     for k, v in self.per_repeat.items()},
                **self.info}


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


# -- Tandem ----------------------------------------------------------------------------------------


def load_tandem(model_dir: Path, shape: Shape, s: Settings, dtype: str, max_num_seqs: int,
                budget: int) -> LLM:
    if s.device.type == "cuda":
        prepare_profiler_for_graphs()
    # Prefix caching off: the repeats of a test recompute their prompts, as transformers does.
    return LLM(model=str(model_dir), dtype=dtype, device=s.device.type, max_num_seqs=max_num_seqs,
               max_num_batched_tokens=budget, max_model_len=s.max_model_len(shape),
               kv_cache_gb=s.kv_cache_gb, cuda_graphs=s.cuda_graphs,
               enable_prefix_caching=False)


def tandem_runner(llm: LLM, prompts: list[list[int]], label: str, device: torch.device) -> Runner:
    def run(max_tokens: int) -> tuple[float, list[list[int]]]:
        elapsed, outputs = timed(lambda: llm.generate(prompts, greedy(max_tokens)), device)
        generated = [list(o.token_ids) for o in outputs]
        check_lengths(label, generated, max_tokens)
        return elapsed, generated

    return run


def run_tandem(model_dir: Path, shape: Shape, s: Settings) -> tuple[SystemRun, dict[str, Any]]:
    """Tandem's decode and prefill rates, and the profile of its batch-1 decode steps."""
    log(f"{shape.name}: tandem ({s.dtype}) loading")
    started = time.perf_counter()
    # One prefill of all prompts fits in a single step, as transformers' one forward pass.
    budget = max(MIN_BATCHED_TOKENS, s.prefill_prompts * s.prefill_len)
    llm = load_tandem(model_dir, shape, s, s.dtype, MAX_NUM_SEQS, budget)
    engine = llm.engine
    result = SystemRun(info={
        "load_s": round(time.perf_counter() - started, 2), "max_num_seqs": MAX_NUM_SEQS,
        "max_num_batched_tokens": budget, "max_model_len": engine.max_model_len,
        "kv_blocks": engine.blocks.num_blocks, "cuda_graphs": engine.runner.graphs is not None,
        "decode_read_bytes": decode_read_bytes(engine.loaded.model, shape.tied)})
    log(f"  loaded in {result.info['load_s']} s, {engine.blocks.num_blocks} KV blocks, "
        f"CUDA graphs {'on' if result.info['cuda_graphs'] else 'off'}")
    prompts = make_prompts(shape.vocab_size, max(s.batches), s.prompt_len, SEED)
    for b in s.batches:
        run = tandem_runner(llm, prompts[:b], f"tandem b{b}", s.device)
        run(WARMUP_TOKENS)
        result.decode[b], result.per_repeat[f"decode_b{b}"] = decode_rate(
            run, b, s.decode_tokens, s.repeats, f"tandem b{b}")
    prefill = make_prompts(shape.vocab_size, s.prefill_prompts, s.prefill_len, SEED + 1)
    run_prefill = tandem_runner(llm, prefill, "tandem prefill", s.device)
    run_prefill(1)
    result.prefill, result.per_repeat["prefill"] = prefill_rate(
        lambda: run_prefill(1)[0], s.prefill_prompts * s.prefill_len, s.repeats, "tandem prefill")
    result.info["graph_replays"] = engine.stats().graph_replays
    profile = profile_b1_decode(llm, prompts[0], s)
    return result, profile


def profile_b1_decode(llm: LLM, prompt: list[int], s: Settings) -> dict[str, Any]:
    """Profile `s.profile_steps` consecutive `engine.step()` calls of one decoding request
    (scheduling, the forward, sampling and the output included), after its prefill and a few
    decode steps."""
    engine = llm.engine
    request = "bench-profile"
    engine.add_request(request, prompt,
                       greedy(PROFILE_WARMUP_STEPS + s.profile_steps + 2))  # never finishes here
    for _ in range(1 + PROFILE_WARMUP_STEPS):  # the prefill (one step: the budget holds it)
        engine.step()
    replays = engine.stats().graph_replays
    profile = profile_steps(engine.step, s.profile_steps, s.device)
    profile["graph_replays_per_step"] = (engine.stats().graph_replays - replays) / s.profile_steps
    engine.abort(request)
    log(f"  profile of {s.profile_steps} b1 decode steps: {profile}")
    return profile


# -- Hugging Face transformers ---------------------------------------------------------------------


def load_hf(model_dir: Path, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, attn_implementation="sdpa", device_map=device.type)
    except ImportError:  # transformers 4 places weights with accelerate, which may be missing
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, attn_implementation="sdpa").to(device)
    return model.eval()


def hf_runner(model: Any, prompts: list[list[int]], label: str, device: torch.device,
              static: bool) -> Runner:
    input_ids = torch.tensor(prompts, device=device)
    attention_mask = torch.ones_like(input_ids)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    # On CUDA, generate compiles the forward by itself when the cache is static.
    cache = {"cache_implementation": "static"} if static else {}

    def run(max_tokens: int) -> tuple[float, list[list[int]]]:
        def generate() -> torch.Tensor:
            with torch.inference_mode():
                return model.generate(
                    input_ids, attention_mask=attention_mask, max_new_tokens=max_tokens,
                    min_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                    pad_token_id=pad_id, **cache)

        elapsed, out = timed(generate, device)
        generated = out[:, input_ids.shape[1]:].tolist()
        check_lengths(label, generated, max_tokens)
        return elapsed, generated

    return run


def hf_prefill(model: Any, prompts: list[list[int]], device: torch.device) -> float:
    """Seconds of one forward pass over the prompt batch that keeps the last logits only."""
    input_ids = torch.tensor(prompts, device=device)

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  logits_to_keep=1, use_cache=True)

    return timed(forward, device)[0]


def run_hf(model_dir: Path, shape: Shape, s: Settings, static: bool) -> SystemRun:
    """transformers' decode rates (and prefill rate, eager only): `generate` with SDPA and the
    dynamic cache, or with `static` the static cache (compiled on CUDA)."""
    label = "hf-static" if static else "hf"
    log(f"{shape.name}: {label} ({s.dtype}) loading")
    started = time.perf_counter()
    model = load_hf(model_dir, DTYPES[s.dtype], s.device)
    result = SystemRun(info={"load_s": round(time.perf_counter() - started, 2),
                             "attention": model.config._attn_implementation})
    log(f"  loaded in {result.info['load_s']} s, attention {result.info['attention']}")
    if static:
        _allow_recompiles()
    prompts = make_prompts(shape.vocab_size, max(s.batches), s.prompt_len, SEED)
    warmup_s = 0.0
    for b in s.batches:
        run = hf_runner(model, prompts[:b], f"{label} b{b}", s.device, static)
        # A static cache is compiled for its length and batch: warm up with the longest run.
        warm = [s.decode_tokens + 1, 1] if static else [WARMUP_TOKENS]
        warmup_s += sum(run(n)[0] for n in warm)
        result.decode[b], result.per_repeat[f"decode_b{b}"] = decode_rate(
            run, b, s.decode_tokens, s.repeats, f"{label} b{b}")
    result.info["warmup_s"] = round(warmup_s, 2)  # with static: mostly compilation
    if static:  # whether generate did compile the decode forward (transformers caches it here)
        result.info["compiled"] = hasattr(model, "_compiled_call")
    if not static:
        prefill = make_prompts(shape.vocab_size, s.prefill_prompts, s.prefill_len, SEED + 1)
        hf_prefill(model, prefill, s.device)
        result.prefill, result.per_repeat["prefill"] = prefill_rate(
            lambda: hf_prefill(model, prefill, s.device), s.prefill_prompts * s.prefill_len,
            s.repeats, f"{label} prefill")
    return result


def _allow_recompiles() -> None:
    """One compiled graph per batch size (and per prefill shape) exceeds dynamo's default
    recompile limit of 8, beyond which it silently falls back to eager."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
