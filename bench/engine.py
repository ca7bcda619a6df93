"""Tandem vs Hugging Face transformers on one CPU: decode, batched decode and prefill speed.

Both systems serve the same checkpoint (default: the embedded SmolLM2-135M-Instruct GGUF) in the
same dtype with the same number of torch threads, in one process, one after the other (Tandem
first, then it is freed before transformers loads, so they never compete for memory or caches).

What is measured (each timing is the best of `--repeats`):

- decode tok/s at batch 1 and batch 16: prompts of `--prompt-len` deterministic token ids (16
  different ones for batch 16). The best time of generating `--decode-tokens + 1` tokens minus
  the best time of generating 1 token (prefill + first token) is the time of the decode steps
  alone; tok/s = batch * decode_tokens / that difference. EOS is ignored so no sequence stops
  early, and every sequence is checked to have exactly the requested number of tokens.
- prefill tok/s: one prompt of `--prefill-len` tokens; Tandem runs `generate(max_tokens=1)`
  (prefix caching off, so repeats recompute), transformers runs one forward pass that keeps the
  logits of the last position only.
- transformers loads a GGUF dequantized (dense weights in the serving dtype, like Tandem) and
  runs `generate` greedily on the same ids; its weight bytes are reported next to Tandem's.
- the batch-1 decode roofline: memory read bandwidth (best `.sum()` over a 1 GiB float32
  tensor) divided by the bytes of the model's weights in the serving dtype, i.e. the tok/s of a
  decoder that does nothing but stream every weight once per token.

Targets: batch-16 decode >= 1.5x transformers, batch-1 decode >= 60% of the roofline, prefill
>= transformers.

Run from the repository root:

    python bench/engine.py [--json]          # full run, a few minutes on 2 cores
    python bench/engine.py --skip-hf --decode-tokens 8 --prefill-len 256 --repeats 1

A table goes to stdout; progress goes to stderr; with `--json` the last stdout line is one JSON
object with every number (transformers fields are null under `--skip-hf`; the prefill keys are
named after `--prefill-len`, e.g. `tandem_prefill_tok_s_2048`). It also carries the tok/s of
each repeat (`per_repeat_tok_s`) and `cpu_share`: process CPU time over wall time x threads
while timing. Keep the machine otherwise idle: with OpenMP threads, a competing process slows
every operator's barrier and can make the numbers several times worse (share well below 1).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tandem.engine.llm import LLM
from tandem.engine.loader import resolve_model_path
from tandem.engine.sampling_params import SamplingParams

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
BATCH = 16
SEED = 1234
TARGET_DECODE_B16_VS_HF = 1.5
TARGET_DECODE_B1_VS_ROOFLINE = 0.6
TARGET_PREFILL_VS_HF = 1.0

# run(max_tokens) -> (seconds, generated token ids per sequence)
Runner = Callable[[int], tuple[float, list[list[int]]]]


@dataclass
class Results:
    """Throughputs of one system; None where not measured."""

    decode_b1: float | None = None
    decode_b16: float | None = None
    prefill: float | None = None
    b1_tokens: list[int] | None = None
    weight_bytes: int | None = None
    per_repeat: dict[str, list[float]] = field(default_factory=dict)  # tok/s of each repeat


@dataclass
class CpuUse:
    """Wall and process CPU seconds summed over the timed calls: with the machine to ourselves,
    cpu / (wall * threads) is close to 1; well below means other processes took cores."""

    wall: float = 0.0
    cpu: float = 0.0

    def share(self, threads: int) -> float | None:
        return self.cpu / (self.wall * threads) if self.wall else None


CPU_USE = CpuUse()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run `fn`; its wall seconds and result. Adds to `CPU_USE`."""
    cpu_start, start = time.process_time(), time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    CPU_USE.wall += elapsed
    CPU_USE.cpu += time.process_time() - cpu_start
    return elapsed, result


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark Tandem against transformers generate on the same model.")
    parser.add_argument("--model", default=None,
                        help="HF directory or .gguf file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads for both systems (default: torch's default)")
    parser.add_argument("--prompt-len", type=int, default=128,
                        help="prompt tokens of the decode tests")
    parser.add_argument("--decode-tokens", type=int, default=64,
                        help="decode steps timed after the first token")
    parser.add_argument("--prefill-len", type=int, default=2048, help="prompt of the prefill test")
    parser.add_argument("--repeats", type=int, default=2, help="timings per test; best is kept")
    parser.add_argument("--skip-hf", action="store_true", help="measure Tandem only")
    parser.add_argument("--json", action="store_true",
                        help="print the results as one JSON object on the last line")
    args = parser.parse_args(argv)
    for name in ("threads", "prompt_len", "decode_tokens", "prefill_len", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# -- inputs and measurements shared by both systems ------------------------------------------------


def make_prompts(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` different prompts of `length` ids in [100, vocab - 100), the same on every run."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab_size - 100, (count, length), generator=gen)
    return ids.tolist()


def memory_read_gbps(repeats: int = 6) -> float:
    """Best read bandwidth, GB/s (1e9), of summing a 1 GiB float32 tensor."""
    data = torch.empty(2**28, dtype=torch.float32).fill_(1)
    data.sum()  # fault in and warm up the reduction
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    nbytes = data.numel() * data.element_size()
    del data
    return nbytes / best / 1e9


def weight_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the parameters in `dtype`; a tied LM head shares (and is counted with) the
    embedding because `named_parameters` de-duplicates shared tensors."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for _, p in model.named_parameters()) * itemsize


def decode_rate(run: Runner, batch: int, tokens: int, repeats: int,
                label: str) -> tuple[float, list[float], list[list[int]]]:
    """tok/s of the decode steps: best time of `tokens + 1` new tokens minus best time of 1 new
    token; also the tok/s of each repeat on its own, and the tokens of the last long run."""
    firsts: list[float] = []
    fulls: list[float] = []
    rates: list[float] = []
    generated: list[list[int]] = []
    for i in range(repeats):
        first, _ = run(1)
        full, generated = run(tokens + 1)
        firsts.append(first)
        fulls.append(full)
        rates.append(batch * tokens / full_minus_first(full, first, label))
        log(f"  {label} repeat {i + 1}: first token {first * 1e3:.1f} ms, "
            f"{tokens + 1} tokens {full * 1e3:.1f} ms, {rates[-1]:.1f} tok/s")
    best = batch * tokens / full_minus_first(min(fulls), min(firsts), label)
    return best, rates, generated


def full_minus_first(full: float, first: float, label: str) -> float:
    if full <= first:
        raise RuntimeError(f"{label}: the long run ({full:.3f} s) was not slower than the "
                           f"first token alone ({first:.3f} s); use more --decode-tokens")
    return full - first


def prefill_rate(run: Callable[[], float], length: int, repeats: int,
                 label: str) -> tuple[float, list[float]]:
    """Best tok/s of a prefill of `length` tokens, and the tok/s of each repeat."""
    rates: list[float] = []
    for i in range(repeats):
        elapsed = run()
        rates.append(length / elapsed)
        log(f"  {label} repeat {i + 1}: {elapsed * 1e3:.1f} ms, {rates[-1]:.1f} tok/s")
    return max(rates), rates


def check_lengths(label: str, generated: list[list[int]], expected: int) -> None:
    counts = sorted({len(t) for t in generated})
    if counts != [expected]:
        raise RuntimeError(f"{label}: generated {counts} tokens per sequence, expected {expected}")


# -- Tandem ----------------------------------------------------------------------------------------


def tandem_runner(llm: LLM, prompts: list[list[int]], label: str) -> Runner:
    def run(max_tokens: int) -> tuple[float, list[list[int]]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        elapsed, outputs = timed(lambda: llm.generate(prompts, params))
        generated = [list(o.token_ids) for o in outputs]
        check_lengths(label, generated, max_tokens)
        return elapsed, generated

    return run


def bench_tandem(args: argparse.Namespace) -> tuple[Results, int]:
    """Tandem's throughputs and weight bytes, and the model's vocabulary size."""
    log("tandem: loading")
    llm = LLM(model=args.model, dtype=args.dtype, num_threads=args.threads,
              enable_prefix_caching=False, max_num_seqs=max(64, BATCH),
              max_num_batched_tokens=max(2048, args.prefill_len))
    vocab = llm.engine.model_config.vocab_size
    decode_prompts = make_prompts(vocab, BATCH, args.prompt_len, SEED)
    prefill_prompt = make_prompts(vocab, 1, args.prefill_len, SEED + 1)
    results = Results(weight_bytes=weight_bytes(llm.engine.runner.model, DTYPES[args.dtype]))

    log("tandem: warm-up")
    tandem_runner(llm, decode_prompts[:1], "tandem warm-up b1")(4)
    tandem_runner(llm, decode_prompts, "tandem warm-up b16")(4)

    log("tandem: decode batch 1")
    results.decode_b1, results.per_repeat["decode_b1"], b1 = decode_rate(
        tandem_runner(llm, decode_prompts[:1], "tandem b1"), 1, args.decode_tokens,
        args.repeats, "tandem b1")
    results.b1_tokens = b1[0]
    log("tandem: decode batch 16")
    results.decode_b16, results.per_repeat[f"decode_b{BATCH}"], _ = decode_rate(
        tandem_runner(llm, decode_prompts, "tandem b16"), BATCH, args.decode_tokens,
        args.repeats, "tandem b16")
    log(f"tandem: prefill {args.prefill_len}")
    run_prefill = tandem_runner(llm, prefill_prompt, "tandem prefill")
    results.prefill, results.per_repeat[f"prefill_{args.prefill_len}"] = prefill_rate(
        lambda: run_prefill(1)[0], args.prefill_len, args.repeats, "tandem prefill")
    return results, vocab  # the engine (weights, KV cache) is freed with this frame


# -- Hugging Face transformers ---------------------------------------------------------------------


def load_hf(model: str | None, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    if path.is_file() and path.suffix == ".gguf":
        # Dense weights in `dtype`, like Tandem's (transformers >= 5 may otherwise keep the GGUF
        # blocks packed when a matmul kernel for them is installed).
        from transformers import GgufConfig

        net = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype,
            quantization_config=GgufConfig(dequantize=True))
    else:
        net = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return net.eval()


def hf_runner(model: Any, prompts: list[list[int]], label: str) -> Runner:
    input_ids = torch.tensor(prompts)
    attention_mask = torch.ones_like(input_ids)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def run(max_tokens: int) -> tuple[float, list[list[int]]]:
        def generate() -> torch.Tensor:
            with torch.inference_mode():
                return model.generate(
                    input_ids, attention_mask=attention_mask, max_new_tokens=max_tokens,
                    min_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                    pad_token_id=pad_id)

        elapsed, out = timed(generate)
        generated = out[:, input_ids.shape[1]:].tolist()
        check_lengths(label, generated, max_tokens)
        return elapsed, generated

    return run


def hf_prefill(model: Any, prompt: list[int]) -> Callable[[], float]:
    input_ids = torch.tensor([prompt])
    attention_mask = torch.ones_like(input_ids)

    def forward() -> Any:
        with torch.inference_mode():
            return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1,
                         use_cache=True)

    def run() -> float:
        return timed(forward)[0]

    return run


def bench_hf(args: argparse.Namespace, vocab: int) -> Results:
    log("transformers: loading")
    model = load_hf(args.model, DTYPES[args.dtype])
    log(f"transformers: {type(model).__name__}, attention {model.config._attn_implementation}")
    decode_prompts = make_prompts(vocab, BATCH, args.prompt_len, SEED)
    prefill_prompt = make_prompts(vocab, 1, args.prefill_len, SEED + 1)
    results = Results(weight_bytes=weight_bytes(model, DTYPES[args.dtype]))

    log("transformers: warm-up")
    hf_runner(model, decode_prompts[:1], "hf warm-up b1")(4)
    hf_runner(model, decode_prompts, "hf warm-up b16")(4)

    log("transformers: decode batch 1")
    results.decode_b1, results.per_repeat["decode_b1"], b1 = decode_rate(
        hf_runner(model, decode_prompts[:1], "hf b1"), 1, args.decode_tokens, args.repeats,
        "hf b1")
    results.b1_tokens = b1[0]
    log("transformers: decode batch 16")
    results.decode_b16, results.per_repeat[f"decode_b{BATCH}"], _ = decode_rate(
        hf_runner(model, decode_prompts, "hf b16"), BATCH, args.decode_tokens, args.repeats,
        "hf b16")
    log(f"transformers: prefill {args.prefill_len}")
    results.prefill, results.per_repeat[f"prefill_{args.prefill_len}"] = prefill_rate(
        hf_prefill(model, prefill_prompt[0]), args.prefill_len, args.repeats, "hf prefill")
    del model
    gc.collect()
    return results


# -- report ----------------------------------------------------------------------------------------


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def matching_prefix(a: list[int] | None, b: list[int] | None) -> int | None:
    if a is None or b is None:
        return None
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def build_report(args: argparse.Namespace, gbps: float, tandem: Results,
                 hf: Results) -> dict[str, Any]:
    nbytes = tandem.weight_bytes or 0
    roofline = gbps * 1e9 / nbytes
    n = args.prefill_len
    report: dict[str, Any] = {
        "tandem_decode_tok_s_b1": tandem.decode_b1,
        "hf_decode_tok_s_b1": hf.decode_b1,
        f"tandem_decode_tok_s_b{BATCH}": tandem.decode_b16,
        f"hf_decode_tok_s_b{BATCH}": hf.decode_b16,
        f"tandem_prefill_tok_s_{n}": tandem.prefill,
        f"hf_prefill_tok_s_{n}": hf.prefill,
        "roofline_decode_tok_s_b1": roofline,
        "decode_b16_vs_hf": ratio(tandem.decode_b16, hf.decode_b16),
        "decode_b1_vs_hf": ratio(tandem.decode_b1, hf.decode_b1),
        "decode_b1_vs_roofline": ratio(tandem.decode_b1, roofline),
        "prefill_vs_hf": ratio(tandem.prefill, hf.prefill),
        "memory_read_gbps": gbps,
        "weight_bytes": nbytes,
        "hf_weight_bytes": hf.weight_bytes,
        "threads": args.threads,
        "cpu_share": CPU_USE.share(args.threads),
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "prefill_len": n,
        "repeats": args.repeats,
        "b1_greedy_tokens_matching_hf": matching_prefix(tandem.b1_tokens, hf.b1_tokens),
    }
    report["per_repeat_tok_s"] = {
        f"{system}_{name}": [round(rate, 2) for rate in rates]
        for system, results in (("tandem", tandem), ("hf", hf))
        for name, rates in results.per_repeat.items()
    }
    report["targets_met"] = {
        name: None if value is None else value >= target
        for name, value, target in target_rows(report)
    }
    return report


def target_rows(report: dict[str, Any]) -> list[tuple[str, float | None, float]]:
    return [
        ("decode_b16_vs_hf", report["decode_b16_vs_hf"], TARGET_DECODE_B16_VS_HF),
        ("decode_b1_vs_roofline", report["decode_b1_vs_roofline"], TARGET_DECODE_B1_VS_ROOFLINE),
        ("prefill_vs_hf", report["prefill_vs_hf"], TARGET_PREFILL_VS_HF),
    ]


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(report: dict[str, Any]) -> None:
    n = report["prefill_len"]
    rows = [
        ("tandem", "decode tok/s, batch 1", fmt(report["tandem_decode_tok_s_b1"])),
        ("transformers", "decode tok/s, batch 1", fmt(report["hf_decode_tok_s_b1"])),
        ("tandem", f"decode tok/s, batch {BATCH}", fmt(report[f"tandem_decode_tok_s_b{BATCH}"])),
        ("transformers", f"decode tok/s, batch {BATCH}",
         fmt(report[f"hf_decode_tok_s_b{BATCH}"])),
        ("tandem", f"prefill tok/s, {n} tokens", fmt(report[f"tandem_prefill_tok_s_{n}"])),
        ("transformers", f"prefill tok/s, {n} tokens", fmt(report[f"hf_prefill_tok_s_{n}"])),
        ("roofline", "decode tok/s, batch 1", fmt(report["roofline_decode_tok_s_b1"])),
        ("machine", "memory read GB/s", fmt(report["memory_read_gbps"])),
        ("model", "weight MB (serving dtype)", fmt(report["weight_bytes"] / 1e6)),
    ]
    print(f"Tandem vs transformers: dtype {report['dtype']}, {report['threads']} threads, "
          f"decode prompt {report['prompt_len']} + {report['decode_tokens']} tokens, "
          f"best of {report['repeats']}")
    width = max(len(r[1]) for r in rows)
    print(f"{'system':<13} {'metric':<{width}} {'value':>10}")
    print("-" * (25 + width))
    for system, metric, value in rows:
        print(f"{system:<13} {metric:<{width}} {value:>10}")
    print()
    print(f"{'ratio':<22} {'value':>8} {'target':>8}  result")
    for name, value, target in target_rows(report):
        verdict = "n/a" if value is None else "pass" if value >= target else "miss"
        print(f"{name:<22} {fmt(value, '.2f'):>8} {'>= ' + format(target, '.2f'):>8}  {verdict}")
    print(f"{'decode_b1_vs_hf':<22} {fmt(report['decode_b1_vs_hf'], '.2f'):>8}")
    share = report["cpu_share"]
    print(f"CPU share while timing: {fmt(share, '.2f')} of {report['threads']} threads"
          + (" -- other processes competed for the CPU, numbers are unreliable"
             if share is not None and share < 0.85 else ""))
    hf_bytes = report["hf_weight_bytes"]
    if hf_bytes is not None and hf_bytes != report["weight_bytes"]:
        print(f"warning: transformers holds {hf_bytes} weight bytes, Tandem "
              f"{report['weight_bytes']}: the two models differ")
    match = report["b1_greedy_tokens_matching_hf"]
    if match is not None:
        print(f"batch-1 greedy tokens equal to transformers: {match} of "
              f"{report['decode_tokens'] + 1} (leading)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log(f"threads {args.threads}, dtype {args.dtype}")
    gbps = memory_read_gbps()
    log(f"memory read bandwidth: {gbps:.1f} GB/s")
    tandem, vocab = bench_tandem(args)
    gc.collect()
    hf = Results() if args.skip_hf else bench_hf(args, vocab)
    report = build_report(args, gbps, tandem, hf)
    print_table(report)
    if args.json:
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
