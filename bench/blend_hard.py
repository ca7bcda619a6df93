"""bench/blend.py --hard: chunk-cache reuse on the hard set (bench/blend_hard_data.py).

One process, one model (bf16 by default), `--threads` torch threads (default 2). Each of the 96
items (6 passages of about 470 tokens, distractors of the same kind, the answer position
balanced) runs under each method:
- full: full prefill. Its answer and next-token logits are the reference; they are cached on
  disk (`--cache-dir`, keyed by the set's digest, dtype and threads) and reused by later runs.
  Its TTFT is measured again in every run: speedups are against this run's full prefill.
- without: full prefill of the prompt without the answer passage (F1 only).
- reuse: every chunk's KV as cached, nothing recomputed (CacheBlend at ratio 0).
- blend@R: CacheBlend, ratio R of the chunk tokens recomputed.
- more methods come from blend_methods.py (the diagnosis and the chunk-cache policies).

By default: full, reuse, CacheBlend at 0.1 / 0.15 / 0.3 / 0.5 and the default policy at caps
0.1 / 0.15 / 0.3 (`blend_methods.CURVES`), the policy's variants from 48 history prompts. The
frozen baseline ran `blend_methods.BASELINE`; the diagnosis `blend_methods.DIAGNOSIS` and the
`craft` rows of the README.

F1 (SQuAD-style, greedy answers of at most 16 tokens) with a paired bootstrap 95% interval of
the difference to full prefill; KL(full || method) of the next-token distribution at the last
prompt position; TTFT from the request to the first token; speedup = full's mean TTFT / the
method's.

    python bench/blend.py --hard [--num 96] [--history 48] [--methods full,reuse,...] [--threads 2]
        [--dtype bfloat16] [--seed 2026] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from statistics import fmean

import torch
from blend_eval import (
    MAX_ANSWER_TOKENS,
    Example,
    answer,
    f1,
    first_output,
    kl,
    log,
    paired_bootstrap,
    run_full,
    truncated,
)
from blend_hard_data import HARD_NUM, HARD_SEED, hard_sets
from blend_methods import CURVES, METHODS, Context, MethodRun

from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.segments import SegmentedPrompt

DEFAULT_CACHE = Path.home() / ".cache" / "tandem-bench" / "blend-hard"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hard", action="store_true", help="(how bench/blend.py hands over)")
    parser.add_argument("--num", type=int, default=HARD_NUM)
    parser.add_argument("--seed", type=int, default=HARD_SEED)
    parser.add_argument("--history", type=int, default=HARD_NUM // 2,
                        help="history prompts whose full prefills leave chunk variants")
    parser.add_argument("--methods", default=",".join(CURVES),
                        help=f"comma-separated, from: {', '.join(METHODS)} (blend@R: any R)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    log(f"loading the model ({args.dtype}, {args.threads} threads)")
    engine = LLMEngine(EngineConfig(dtype=args.dtype, num_threads=args.threads,
                                    enable_prefix_caching=False, kv_cache_gb=0.5))
    tokenizer = engine.tokenizer

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    raw_items, raw_history = hard_sets(count, num=args.num, history=args.history,
                                       seed=args.seed)
    digest = hashlib.sha256(json.dumps(raw_items, sort_keys=True).encode()).hexdigest()[:16]
    log(f"hard set: {len(raw_items)} items, seed {args.seed}, digest {digest}")
    items = [Example.parse(e, f"item {i}") for i, e in enumerate(raw_items)]
    history = [Example.parse(e, f"history {i}") for i, e in enumerate(raw_history)]
    prompts = [SegmentedPrompt.tokenize(tokenizer, e.segments(), 0.0) for e in items]
    params = SamplingParams(max_tokens=MAX_ANSWER_TOKENS, temperature=0, stop=["\n"],
                            stop_token_ids=[engine.eos_token_id])
    methods = [m for m in args.methods.split(",") if m]
    ctx = Context(engine, params, tokenizer,
                  [SegmentedPrompt.tokenize(tokenizer, e.segments(), 0.0) for e in history])
    for name in methods:
        if name not in ("full", "without"):
            ctx.method(name)  # unknown names fail before anything runs
    reference = load_reference(engine, items, prompts, params, args,
                               [item_digest(e) for e in raw_items])

    ctx.warm(prompts)
    f1s: dict[str, list[float]] = {m: [] for m in methods}
    kls: dict[str, list[float]] = {m: [] for m in methods}
    ttfts: dict[str, list[float]] = {m: [] for m in methods}
    extra: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    for i, (item, prompt) in enumerate(zip(items, prompts, strict=True)):
        line = []
        for name in methods:
            run = run_method(ctx, name, item, prompt, reference[i])
            f1s[name].append(f1(run.answer, item.answer))
            ttfts[name].append(run.ttft_s)
            if run.kl is not None:
                kls[name].append(run.kl)
            for key, value in run.stats.items():
                extra[name].setdefault(key, []).append(value)
            line.append(f"{name} {run.answer.strip()!r}")
        log(f"[{i + 1}/{len(items)}] gold {item.answer!r} (passage {item.answer_chunk}): "
            + " | ".join(line))
    results = summarize(methods, f1s, kls, ttfts, extra, reference)
    results["digest"], results["num_items"] = digest, len(items)
    results["wall_s"] = time.perf_counter() - started
    report(results, methods, args)
    if args.json:
        print(json.dumps(results))


def run_method(ctx: Context, name: str, item: Example, prompt: SegmentedPrompt,
               ref: dict) -> MethodRun:
    if name == "full":
        start = time.perf_counter()
        ctx.engine.add_request("full", prompt.token_ids, ctx.params, prefill_only=True)
        first_output(ctx.engine, "full")
        ttft = time.perf_counter() - start
        ctx.engine.release("full")
        return MethodRun(ttft, ref["answer"], 0.0)
    if name == "without":
        drop = SegmentedPrompt.tokenize(ctx.tokenizer, item.segments(item.answer_chunk))
        return MethodRun(0.0, answer(ctx.engine, drop.token_ids, ctx.params), None)
    run = ctx.method(name)(prompt)
    if run.kv is not None:
        logits = ctx.engine.score(prompt.token_ids, prefix_kv=run.kv)[-1]
        run.kl = kl(ref["logits"], logits)
        run.kv = None
    return run


def load_reference(engine: LLMEngine, items: list[Example], prompts: list[SegmentedPrompt],
                   params: SamplingParams, args: argparse.Namespace, digests: list[str]) \
        -> list[dict]:
    """Full prefill's answer and last-position logits per item, from the disk cache (keyed by
    each item's digest) or computed and cached."""
    path = args.cache_dir / f"reference-{args.dtype}-t{args.threads}.pt"
    cached: dict[str, dict] = torch.load(path, weights_only=True) if path.exists() else {}
    missing = [i for i, d in enumerate(digests) if d not in cached]
    log(f"full-prefill reference: {len(digests) - len(missing)} items cached in {path}, "
        f"{len(missing)} to compute")
    for done, i in enumerate(missing, start=1):
        prompt = prompts[i]
        full = run_full(engine, prompt.token_ids, params)
        assert full.kv is not None
        chunks_end = len(prompt.prefix) + prompt.num_chunk_tokens
        logits = engine.score(prompt.token_ids, prefix_kv=truncated(full.kv, chunks_end))[-1]
        cached[digests[i]] = {"answer": full.answer, "logits": logits.float().clone()}
        if done % 8 == 0 or done == len(missing):
            log(f"  reference {done}/{len(missing)}")
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(cached, path)
    return [cached[d] for d in digests]


def item_digest(item: dict) -> str:
    return hashlib.sha256(json.dumps(item, sort_keys=True).encode()).hexdigest()[:16]


def summarize(methods: list[str], f1s, kls, ttfts, extra, reference) -> dict:
    r: dict = {"methods": {}}
    full_ttft = fmean(ttfts["full"]) if "full" in ttfts else None
    for name in methods:
        m: dict = {"f1": fmean(f1s[name])}
        if name != "full" and "full" in f1s:
            m["f1_diff"] = paired_bootstrap(f1s[name], f1s["full"])
        if kls[name]:
            m["kl"] = fmean(kls[name])
        if name != "without":
            m["ttft_s"] = fmean(ttfts[name])
            if full_ttft is not None:
                m["speedup"] = full_ttft / m["ttft_s"]
        m.update({k: fmean(v) for k, v in extra[name].items()})
        r["methods"][name] = m
    return r


def report(r: dict, methods: list[str], args: argparse.Namespace) -> None:
    print(f"hard set: {r['num_items']} items (digest {r['digest']}), {args.dtype}, "
          f"{args.threads} threads, {r['wall_s']:.0f} s")
    print(f"{'method':<22} {'F1':>6} {'F1 - full [95% CI]':>26} {'KL':>8} {'TTFT s':>7} "
          f"{'speedup':>8}")
    for name in methods:
        m = r["methods"][name]
        diff = m.get("f1_diff")
        ci = f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]" if diff else "-"
        kl_text = f"{m['kl']:.4f}" if "kl" in m else "-"
        ttft = f"{m['ttft_s']:.3f}" if "ttft_s" in m else "-"
        speed = f"{m['speedup']:.2f}x" if "speedup" in m else "-"
        print(f"{name:<22} {m['f1']:>6.3f} {ci:>26} {kl_text:>8} {ttft:>7} {speed:>8}")
        others = {k: v for k, v in m.items()
                  if k not in ("f1", "f1_diff", "kl", "ttft_s", "speedup")}
        if others:
            print("    " + ", ".join(f"{k} {v:.3g}" for k, v in others.items()))


if __name__ == "__main__":
    main()
