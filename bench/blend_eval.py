"""What bench/blend.py and bench/blend_hard.py share: examples, answer scores, and the timed
runs of one prompt (full prefill, blended), all on one `LLMEngine` in this process."""

from __future__ import annotations

import json
import random
import re
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

import torch

from tandem.engine.blend import BlendResult, compute_kv
from tandem.engine.blend_planner import BlendPlanner
from tandem.engine.blend_select import BlendOptions
from tandem.engine.engine import LLMEngine
from tandem.engine.kv_cache import KVBlocks
from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.segments import SegmentedPrompt
from tandem.kv_store.chunk_cache import StoreChunkCache
from tandem.kv_store.store import TieredStore

PUNCTUATION = set(string.punctuation)
MAX_ANSWER_TOKENS = 16


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
                params: SamplingParams, name: str,
                options: BlendOptions | None = None) -> tuple[Run, BlendResult]:
    start = time.perf_counter()
    result = planner.plan(prompt) if options is None else planner.plan(prompt, options=options)
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


def paired_bootstrap(a: list[float], b: list[float], rounds: int = 10_000, seed: int = 0) \
        -> tuple[float, float, float]:
    """mean(a - b) and its 95% interval, resampling the items (pairs) with replacement."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_bootstrap: need two equally long, non-empty lists")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    rng, n = random.Random(seed), len(diffs)
    means = sorted(fmean(rng.choices(diffs, k=n)) for _ in range(rounds))
    return fmean(diffs), means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]
