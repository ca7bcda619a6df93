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
- blend: CacheBlend at `--ratio` of the chunk tokens recomputed.
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
import re
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import fmean

import torch
from blend_data import generate  # bench/blend_data.py, next to this script

from tandem.engine.blend import BlendResult, compute_kv
from tandem.engine.blend_planner import BlendPlanner
from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.kv_cache import KVBlocks
from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.segments import DEFAULT_RECOMPUTE_RATIO, SegmentedPrompt
from tandem.kv_store.chunk_cache import StoreChunkCache
from tandem.kv_store.store import TieredStore
from tandem.kv_store.tiers.memory import MemoryTier

DEFAULT_NUM = 8
PUNCTUATION = set(string.punctuation)
MAX_ANSWER_TOKENS = 16
TARGET_SPEEDUP, TARGET_F1_GAP, TARGET_KL_SHARE = 3.0, 0.02, 0.5
CPU_TIER_BYTES = 2 * 2**30
METHODS = ("full", "prefix", "reuse", "blend")
LABELS = {"full": "full prefill", "prefix": "prefix caching", "reuse": "full reuse",
          "blend": "CacheBlend"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- examples --------------------------------------------------------------------------------


@dataclass
class Example:
    prefix: str
    chunks: list[str]
    question: str
    answer: str
    answer_prefix: str = ""
    answer_chunk: int | None = None  # the chunk that holds the answer, when known

    def segments(self, drop: int | None = None) -> list[str]:
        tail = f"\n\nQuestion: {self.question}\nAnswer:"
        if self.answer_prefix:
            tail += " " + self.answer_prefix
        return [self.prefix, *("\n\n" + c for i, c in enumerate(self.chunks) if i != drop), tail]

    def answering_chunk(self) -> int | None:
        if self.answer_chunk is not None:
            return self.answer_chunk
        gold = self.answer.lower()
        return next((i for i, c in enumerate(self.chunks) if gold and gold in c.lower()), None)

    @classmethod
    def parse(cls, line: dict, where: str) -> Example:
        def text(key: str, default: str | None = None) -> str:
            value = line.get(key, default)
            if not isinstance(value, str):
                raise ValueError(f"{where}: {key!r} must be a string")
            return value

        chunks = line.get("chunks")
        if not isinstance(chunks, list) or not chunks or \
                not all(isinstance(c, str) and c for c in chunks):
            raise ValueError(f"{where}: 'chunks' must be a list of non-empty strings")
        index = line.get("answer_chunk")
        if not isinstance(index, int) or not 0 <= index < len(chunks):
            index = None
        return cls(text("prefix", ""), chunks, text("question"), text("answer"),
                   text("answer_prefix", ""), index)


def load_examples(path: Path, num: int | None) -> list[Example]:
    examples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                examples.append(Example.parse(json.loads(line), f"{path}:{number}"))
    if not examples:
        sys.exit(f"error: {path} holds no examples")
    return examples[:num] if num else examples


# -- scores ----------------------------------------------------------------------------------


def normalize(text: str) -> list[str]:
    """SQuAD's answer normalization, as tokens."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def f1(prediction: str, gold: str) -> float:
    pred, ref = normalize(prediction), normalize(gold)
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction), normalize(reference)
    if not pred or not ref:
        return float(pred == ref)
    row = [0] * (len(ref) + 1)  # row[j]: LCS of the tokens of pred so far and ref[:j]
    for p in pred:
        above_left = 0
        for j, r in enumerate(ref, start=1):
            above = row[j]
            row[j] = above_left + 1 if p == r else max(above, row[j - 1])
            above_left = above
    lcs = row[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """KL(reference || other) of two next-token logit rows, in float32."""
    p, q = torch.log_softmax(reference.float(), -1), torch.log_softmax(other.float(), -1)
    return float((p.exp() * (p - q)).sum())


# -- runs ------------------------------------------------------------------------------------


@dataclass
class Run:
    ttft_s: float
    answer: str
    cached_tokens: int = 0
    recomputed_tokens: int = 0
    plan_s: float = 0.0  # reuse and blend: of the TTFT, the chunks' reads and the blend
    kv: KVBlocks | None = field(default=None, repr=False)  # full: the prompt's exact KV


def first_output(engine: LLMEngine, request_id: str) -> RequestOutput:
    """Step until the request produces an output (its next token, or its end)."""
    while True:
        for out in engine.step():
            if out.request_id == request_id:
                return out


def finish(engine: LLMEngine, request_id: str) -> RequestOutput:
    while not (out := first_output(engine, request_id)).finished:
        pass
    return out


def timed(engine: LLMEngine, request_id: str, start: float) -> tuple[float, RequestOutput]:
    """(seconds from `start` to the request's first token, its final output)."""
    out = first_output(engine, request_id)
    elapsed = time.perf_counter() - start
    return elapsed, out if out.finished else finish(engine, request_id)


def run_full(engine: LLMEngine, ids: list[int], params: SamplingParams) -> Run:
    """Full prefill to the first token (prefill only, to keep the KV), then the answer decoded
    on from that token and KV."""
    start = time.perf_counter()
    engine.add_request("full", ids, params, prefill_only=True)
    first = first_output(engine, "full")
    ttft = time.perf_counter() - start
    kv = engine.export_kv("full")
    engine.release("full")
    engine.reserve("full", ids, params)
    out = engine.adopt("full", kv, first.token_ids)
    if not out.finished:
        out = finish(engine, "full")
    return Run(ttft, out.text, kv=kv)


def run_prefix(engine: LLMEngine, prompt: SegmentedPrompt, params: SamplingParams) -> Run:
    """On a fresh engine: the prefix alone (untimed, to fill the prefix cache), then the prompt."""
    if prompt.prefix:
        engine.add_request("warm", prompt.prefix, params, prefill_only=True)
        first_output(engine, "warm")
        engine.release("warm")
    start = time.perf_counter()
    engine.add_request("prefix", prompt.token_ids, params)
    ttft, out = timed(engine, "prefix", start)
    return Run(ttft, out.text, out.num_cached_tokens)


def run_blended(engine: LLMEngine, planner: BlendPlanner, prompt: SegmentedPrompt,
                params: SamplingParams, name: str) -> tuple[Run, BlendResult]:
    start = time.perf_counter()
    result = planner.plan(prompt)
    plan_s = time.perf_counter() - start
    engine.add_request(name, prompt.token_ids, params, blended=result)
    ttft, out = timed(engine, name, start)
    return Run(ttft, out.text, result.cached_tokens, result.recomputed_tokens, plan_s), result


def answer(engine: LLMEngine, ids: list[int], params: SamplingParams) -> str:
    engine.add_request("answer", ids, params)
    return finish(engine, "answer").text


def truncated(kv: KVBlocks, num_tokens: int) -> KVBlocks:
    blocks = kv.spec.num_blocks_for(num_tokens)
    return KVBlocks(kv.spec, num_tokens, kv.data[:, :, :blocks].contiguous())


# -- the bench -------------------------------------------------------------------------------


@dataclass
class Totals:
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def mean(self, key: str) -> float:
        return fmean(self.values[key])


def warm_chunks(engine: LLMEngine, cache: StoreChunkCache, store: TieredStore,
                prompts: list[SegmentedPrompt]) -> int:
    """Write every distinct chunk's KV (computed on its own) to the CPU tier."""
    distinct = list({tuple(c): c for p in prompts for c in p.chunks}.values())
    for i, chunk in enumerate(distinct, start=1):
        cache.put(chunk, compute_kv(engine.loaded.model, engine.kv_spec, chunk))
        if i % 16 == 0 or i == len(distinct):
            store.flush(120)
            log(f"  {i}/{len(distinct)} chunks in the CPU tier")
    missing = sum(not cache.contains(c) for c in distinct)
    if missing:
        raise RuntimeError(f"{missing} of {len(distinct)} chunks did not reach the CPU tier")
    return len(distinct)


def main() -> None:
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
