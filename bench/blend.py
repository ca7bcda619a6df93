"""CacheBlend: TTFT and answer quality of four ways to prefill a retrieval-augmented prompt.

One process, one loaded model (the shipped SmolLM2-135M-Instruct, bf16 by default), `--threads`
torch threads (default 1, as each prefill worker runs: one per core). Each example is a prompt
of segments: the prefix, then
"\\n\\n" + chunk for each retrieved chunk, then "\\n\\nQuestion: " + question + "\\nAnswer:" and,
when the example has one, " " + answer_prefix; each segment is tokenized on its own. Examples come
from `--data` (JSON lines with "chunks", "question", "answer" and optionally "prefix" and
"answer_prefix"; other keys are ignored) or from bench/blend_data.py's synthetic set.

Methods, per example, in this order:
- full: prefill of the whole prompt, the engine's prefix cache off;
- prefix: the engine's prefix cache holds the prefix segment (whole 16-token blocks of it, from a
  run of the prefix alone on a fresh engine), then the whole prompt;
- reuse: every chunk's KV as cached (computed on its own), nothing recomputed (ratio 0);
- blend: the default chunk-reuse policy (blend_select.DEFAULT_POLICY: Cache-Craft, at most
  `--ratio` of the chunk tokens recomputed).
Reuse and blend read the chunks' KV from a tiered store with one CPU (memory) tier, written there
before any timing; their prefix is computed in full each time, like the question.

- TTFT: seconds from the request to its first token (for reuse and blend: planning, i.e. the
  chunks' lookups, reads and the blend, then the question's prefill); the mean over examples.
  speedup = ttft_full_s / ttft_blend_s.
- Answers: greedy, at most 16 tokens, cut at the first newline or end-of-turn token. F1 against
  the gold answer, SQuAD-style (lowercase, no punctuation, no articles, whitespace tokens);
  ROUGE-L (F-measure of the longest common subsequence of the same tokens) against full
  prefill's answer. The full answer continues from full prefill's own first token and KV.
- KL(full || method) of the next-token distributions at the last prompt position (float32):
  the question is scored on top of the method's KV of prefix + chunks, and on top of full
  prefill's exact KV of the same tokens for the reference.
- Ablation (unless `--no-ablation`): F1 of full prefill without the chunk that holds the answer
  (the example's "answer_chunk", else the first chunk that contains the answer): a set the model
  answers from its context scores near 0 there.

`--hard` runs bench/blend_hard.py instead (the hard set; see its docstring for its options).

Targets: speedup >= 3; F1 of blend within 0.02 of full; KL of blend below half of reuse's.

    python bench/blend.py [--data FILE.jsonl] [--num N] [--ratio 0.15] [--dtype bfloat16]
        [--threads N] [--seed 0] [--chunks 6] [--chunk-tokens 512] [--no-ablation] [--json]

A table goes to stdout, progress to stderr; with `--json` the last line is one JSON object with
`ttft_{full,prefix,reuse,blend}_s`, `speedup`, `f1_{full,prefix,reuse,blend}`,
`rougel_{prefix,reuse,blend}`, `kl_{reuse,blend}`, `f1_full_without_answer_chunk` (with the
ablation), `plan_{reuse,blend}_s` (of their TTFT, the planner's part: the chunks' reads and the
blend), `{reuse,blend}_{cached,recomputed}_tokens`, `prefix_cached_tokens`, `num_examples`,
`prompt_tokens` and `recompute_ratio` (the means per example).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from blend_data import generate  # bench/blend_data.py, next to this script
from blend_eval import (
    MAX_ANSWER_TOKENS,
    Example,
    Totals,
    answer,
    f1,
    kl,
    load_examples,
    log,
    rouge_l,
    run_blended,
    run_full,
    run_prefix,
    truncated,
    warm_chunks,
)

from tandem.engine.blend_planner import BlendPlanner
from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.segments import DEFAULT_RECOMPUTE_RATIO, SegmentedPrompt
from tandem.kv_store.chunk_cache import StoreChunkCache
from tandem.kv_store.store import TieredStore
from tandem.kv_store.tiers.memory import MemoryTier

DEFAULT_NUM = 8
TARGET_SPEEDUP, TARGET_F1_GAP, TARGET_KL_SHARE = 3.0, 0.02, 0.5
CPU_TIER_BYTES = 2 * 2**30
METHODS = ("full", "prefix", "reuse", "blend")
LABELS = {"full": "full prefill", "prefix": "prefix caching", "reuse": "full reuse",
          "blend": "CacheBlend"}


def main() -> None:
    if "--hard" in sys.argv[1:]:  # the hard set has a bench of its own
        from blend_hard import main as hard_main

        return hard_main(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="JSON lines of examples (default: bench/blend_data.py's set)")
    parser.add_argument("--num", type=int, default=None,
                        help=f"examples to run (default: all of --data, or {DEFAULT_NUM})")
    parser.add_argument("--ratio", type=float, default=DEFAULT_RECOMPUTE_RATIO,
                        help="CacheBlend's recompute ratio")
    parser.add_argument("--dtype", default="bfloat16",
                        choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--seed", type=int, default=0, help="of the synthetic set")
    parser.add_argument("--chunks", type=int, default=6, help="of the synthetic set")
    parser.add_argument("--chunk-tokens", type=int, default=512, help="of the synthetic set")
    parser.add_argument("--no-ablation", action="store_true",
                        help="skip full prefill without the answer-bearing chunk")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    log(f"loading the model ({args.dtype}, {args.threads} threads)")
    config = dict(model=args.model, dtype=args.dtype, num_threads=args.threads)
    engine = LLMEngine(EngineConfig(**config, enable_prefix_caching=False, kv_cache_gb=0.5))
    tokenizer = engine.tokenizer
    if args.data is not None:
        examples = load_examples(args.data, args.num)
    else:
        log(f"generating {args.num or DEFAULT_NUM} synthetic examples")
        def count(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False))

        examples = [Example.parse(e, f"example {i}") for i, e in enumerate(generate(
            count, args.num or DEFAULT_NUM, seed=args.seed, chunks=args.chunks,
            chunk_tokens=args.chunk_tokens))]
    prompts = [SegmentedPrompt.tokenize(tokenizer, e.segments(), args.ratio) for e in examples]
    longest = max(len(p.token_ids) for p in prompts) + MAX_ANSWER_TOKENS
    prefix_config = EngineConfig(**config, enable_prefix_caching=True,
                                 num_kv_blocks=2 * engine.kv_spec.num_blocks_for(longest) + 4)
    params = SamplingParams(max_tokens=MAX_ANSWER_TOKENS, temperature=0, stop=["\n"],
                            stop_token_ids=[engine.eos_token_id])

    store = TieredStore([MemoryTier("cpu", CPU_TIER_BYTES)], engine.fingerprint, engine.kv_spec,
                        promote_on_hit=False)
    cache = StoreChunkCache(store)
    planner = BlendPlanner(engine.loaded.model, engine.kv_spec, cache)
    log("computing the chunks' KV into the CPU tier")
    num_distinct = warm_chunks(engine, cache, store, prompts)
    log("warm-up run (untimed)")
    run_blended(engine, planner, prompts[0], params, "warm-up")
    run_full(engine, prompts[0].token_ids[:512], params)

    totals = Totals()
    for i, (example, prompt) in enumerate(zip(examples, prompts, strict=True), start=1):
        ids = prompt.token_ids
        log(f"[{i}/{len(examples)}] {len(ids)} tokens, {len(prompt.chunks)} chunks")
        full = run_full(engine, ids, params)
        prefix = run_prefix(LLMEngine(prefix_config, engine.loaded), prompt, params)
        reuse, reused = run_blended(engine, planner, _with_ratio(prompt, 0.0), params, "reuse")
        blend, blended = run_blended(engine, planner, prompt, params, "blend")
        runs = {"full": full, "prefix": prefix, "reuse": reuse, "blend": blend}

        reference = engine.score(ids, prefix_kv=truncated(full.kv, blended.kv.num_tokens))[-1]
        for name, result in (("reuse", reused), ("blend", blended)):
            totals.add(f"kl_{name}", kl(reference, engine.score(ids, prefix_kv=result.kv)[-1]))
        for name, run in runs.items():
            totals.add(f"ttft_{name}_s", run.ttft_s)
            totals.add(f"f1_{name}", f1(run.answer, example.answer))
            if name != "full":
                totals.add(f"rougel_{name}", rouge_l(run.answer, full.answer))
        for name in ("reuse", "blend"):
            totals.add(f"plan_{name}_s", runs[name].plan_s)
            totals.add(f"{name}_cached_tokens", runs[name].cached_tokens)
            totals.add(f"{name}_recomputed_tokens", runs[name].recomputed_tokens)
        totals.add("prefix_cached_tokens", prefix.cached_tokens)
        totals.add("prompt_tokens", len(ids))
        line = " | ".join(f"{name} {run.ttft_s:.2f}s {run.answer.strip()!r}"
                          for name, run in runs.items())
        drop = example.answering_chunk()
        if not args.no_ablation and drop is not None:
            without = SegmentedPrompt.tokenize(tokenizer, example.segments(drop))
            text = answer(engine, without.token_ids, params)
            totals.add("f1_full_without_answer_chunk", f1(text, example.answer))
            line += f" | without {text.strip()!r}"
        log(f"  gold {example.answer!r}: {line}")
    store.close()

    results = {key: totals.mean(key) for key in totals.values}
    results["speedup"] = results["ttft_full_s"] / results["ttft_blend_s"]
    results["num_examples"] = len(examples)
    results["recompute_ratio"] = args.ratio
    report(results, num_distinct, args)
    if args.json:
        print(json.dumps({k: round(v, 4) for k, v in results.items()}))


def _with_ratio(prompt: SegmentedPrompt, ratio: float) -> SegmentedPrompt:
    return replace(prompt, recompute_ratio=ratio)


def report(r: dict[str, float], num_distinct: int, args: argparse.Namespace) -> None:
    print(f"{r['num_examples']} examples of {r['prompt_tokens']:.0f} tokens on average, "
          f"{num_distinct} distinct chunks in the CPU tier; {args.dtype}, {args.threads} "
          f"threads, recompute ratio {args.ratio:g}")
    print(f"{'method':<15} {'TTFT s':>7} {'speedup':>8} {'F1':>6} {'ROUGE-L':>8} {'KL':>7} "
          f"{'cached':>7} {'recomputed':>10}")
    for name in METHODS:
        rouge = "1 (ref)" if name == "full" else f"{r[f'rougel_{name}']:.3f}"
        divergence = "0 (ref)" if name == "full" else _opt(r, f"kl_{name}", ".4f")
        print(f"{LABELS[name]:<15} {r[f'ttft_{name}_s']:>7.3f} "
              f"{r['ttft_full_s'] / r[f'ttft_{name}_s']:>7.2f}x {r[f'f1_{name}']:>6.3f} "
              f"{rouge:>8} {divergence:>7} {_opt(r, f'{name}_cached_tokens', '.0f'):>7} "
              f"{_opt(r, f'{name}_recomputed_tokens', '.0f'):>10}")
    print(f"of the TTFT, planning (chunk reads from the CPU tier + blend): reuse "
          f"{r['plan_reuse_s']:.3f} s, blend {r['plan_blend_s']:.3f} s")
    if "f1_full_without_answer_chunk" in r:
        print(f"full prefill without the answer-bearing chunk: F1 "
              f"{r['f1_full_without_answer_chunk']:.3f}")
    gap = r["f1_blend"] - r["f1_full"]
    checks = [
        (f"speedup {r['speedup']:.2f}x >= {TARGET_SPEEDUP:g}x", r["speedup"] >= TARGET_SPEEDUP),
        (f"F1 blend - full {gap:+.3f} within {TARGET_F1_GAP:g}", abs(gap) <= TARGET_F1_GAP),
        (f"KL {r['kl_blend']:.4f} < {TARGET_KL_SHARE:g} x reuse's {r['kl_reuse']:.4f}",
         r["kl_blend"] < TARGET_KL_SHARE * r["kl_reuse"]),
    ]
    print("targets: " + "; ".join(f"{text} {'met' if ok else 'MISSED'}" for text, ok in checks))


def _opt(r: dict[str, float], key: str, spec: str) -> str:
    """A value not every method has ("-" where not measured)."""
    return format(r[key], spec) if key in r else "-"


if __name__ == "__main__":
    main()
