"""The ways bench/blend_hard.py prefills a prompt from chunk caches, by name:
- `reuse`: every chunk's KV as cached, nothing recomputed;
- `blend@R`: CacheBlend at ratio R, with any of these modifiers (the diagnosis), e.g.
  `blend@0.15+sink8+question`:
  - `+sinkK`: each chunk's first K tokens always recomputed;
  - `+neutral`: chunks' KV computed behind a shared neutral prefix (then moved to position 0);
  - `+once`: one selection at layer 1, kept through every layer (not gradual filtering);
  - `+question`: question-aware selection (half of the budget by the question's attention);
  - `+rope16`: the keys' position shift in the KV dtype instead of float32;
  - `+perchunk`: the budget split evenly per chunk instead of one competition;
  - `+qbudget` (craft only): question-aware, and each chunk's budget weighed by the question's
    attention to it.
- `craft@CAP`: Cache-Craft: chunk variants captured from the history prompts' full prefills
  (the best-matching one, else the chunk's own KV), per-chunk budgets from each chunk's
  dependence measured at layer 1 (`dependence_scale` x dependence x tokens), their total
  capped at CAP of the chunk tokens, question-aware: the default policy
  (`blend_select.DEFAULT_POLICY`) at CAP (`craft` alone: the default ratio, 0.15). Modifiers as
  above, and `+novariants` (own KV only), `+scaleX` (the dependence scale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from blend_eval import first_output, log, run_blended

from tandem.engine.blend import compute_kv, shift_keys
from tandem.engine.blend_planner import BlendPlanner
from tandem.engine.blend_select import CACHEBLEND, DEFAULT_POLICY, BlendOptions
from tandem.engine.chunk_cache import MemoryChunkCache
from tandem.engine.engine import LLMEngine
from tandem.engine.kv_cache import KVBlocks
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.segments import DEFAULT_RECOMPUTE_RATIO, SegmentedPrompt
from tandem.engine.tokenizer import Tokenizer

BASELINE = ("full", "without", "reuse", "blend@0.1", "blend@0.15", "blend@0.2", "blend@0.3",
            "blend@0.5")  # the frozen baseline's run (docs/blend_hard_baseline.md)
CURVES = ("full", "reuse", "blend@0.1", "blend@0.15", "blend@0.3", "blend@0.5", "craft@0.1",
          "craft", "craft@0.3")  # the default: F1 against speedup, CacheBlend and the policy
DIAGNOSIS = ("blend@0.15+sink8", "blend@0.15+neutral", "blend@0.15+once",
             "blend@0.15+question", "blend@0.15+rope16", "blend@0.15+perchunk")
METHODS = ("full", "without", "reuse", "blend@R[+modifiers]")
CACHE_BYTES = 4 << 30
DEFAULT_CAP = DEFAULT_RECOMPUTE_RATIO
DEFAULT_SCALE = 1.0
NEUTRAL = "The following passage is one of several retrieved documents.\n\n"


@dataclass
class MethodRun:
    ttft_s: float
    answer: str
    kl: float | None
    kv: KVBlocks | None = None  # the blended KV of prefix + chunks, for the KL
    stats: dict[str, float] = field(default_factory=dict)


Method = Callable[[SegmentedPrompt], MethodRun]


class Context:
    def __init__(self, engine: LLMEngine, params: SamplingParams, tokenizer: Tokenizer,
                 history: list[SegmentedPrompt]) -> None:
        self.engine, self.params, self.tokenizer, self.history = \
            engine, params, tokenizer, history
        model, spec = engine.loaded.model, engine.kv_spec
        self.isolated = MemoryChunkCache(CACHE_BYTES)
        self.neutral = MemoryChunkCache(CACHE_BYTES)
        self.craft = MemoryChunkCache(CACHE_BYTES)
        self.planners = {"isolated": BlendPlanner(model, spec, self.isolated),
                         "neutral": BlendPlanner(model, spec, self.neutral),
                         "craft": BlendPlanner(model, spec, self.craft)}
        self.captured = False

    def warm(self, prompts: list[SegmentedPrompt]) -> None:
        """Every distinct chunk's KV into the caches, and one untimed blend."""
        distinct = {tuple(c): c for p in prompts for c in p.chunks}
        model, spec = self.engine.loaded.model, self.engine.kv_spec
        neutral = self.tokenizer.encode(NEUTRAL, add_special_tokens=False)
        for chunk in distinct.values():
            own = compute_kv(model, spec, chunk)
            self.isolated.put(chunk, own)
            self.craft.put(chunk, own)
            kv = compute_kv(model, spec, neutral + chunk)[:, :, len(neutral):].clone()
            for layer in range(spec.num_layers):  # keys back to position 0
                kv[layer, 0] = shift_keys(model, kv[layer, 0], -len(neutral))
            self.neutral.put(chunk, kv)
        log(f"{len(distinct)} distinct chunks cached on their own and behind a neutral prefix")
        run_blended(self.engine, self.planners["isolated"],
                    replace(prompts[0], recompute_ratio=0.15), self.params, "warm-up")

    def capture_history(self) -> None:
        """Full prefills of the history prompts: their chunk variants into the craft cache."""
        if self.captured:
            return
        engine, planner = self.engine, self.planners["craft"]
        for i, prompt in enumerate(self.history):
            engine.add_request("history", prompt.token_ids, self.params, prefill_only=True)
            first_output(engine, "history")
            kv = engine.export_kv("history")
            engine.release("history")
            planner.capture(prompt, kv)
            if (i + 1) % 16 == 0:
                log(f"  history {i + 1}/{len(self.history)}: {planner.stats.totals.captured} "
                    "variants captured")
        self.captured = True

    def method(self, name: str) -> Method:
        if name == "craft" or name.startswith("craft@") or name.startswith("craft+"):
            head, *modifiers = name.split("+")
            cap = _ratio(name, head.split("@", 1)[1]) if "@" in head else DEFAULT_CAP
            options, _, _ = _options(name, [m for m in modifiers
                                                  if m != "novariants"
                                                  and not m.startswith("scale")],
                                     DEFAULT_POLICY)
            scale = next((float(m[5:]) for m in modifiers if m.startswith("scale")),
                         DEFAULT_SCALE)
            options = replace(options, dependence_scale=scale)
            if "novariants" in modifiers:
                return self._blend(cap, options, "isolated")
            self.capture_history()
            return self._blend(cap, options, "craft")
        if name == "reuse":
            return self._blend(0.0, BlendOptions(), "isolated")
        if name.startswith("blend@"):
            ratio, *modifiers = name.split("@", 1)[1].split("+")
            return self._blend(_ratio(name, ratio), *_options(name, modifiers))
        raise SystemExit(f"error: unknown method {name!r} (methods: {', '.join(METHODS)})")

    def _blend(self, ratio: float, options: BlendOptions, cache: str,
               per_chunk: bool = False) -> Method:
        planner = self.planners[cache]

        def run(prompt: SegmentedPrompt) -> MethodRun:
            opts = options
            if per_chunk:
                opts = replace(opts, budgets=tuple(round(ratio * len(c)) for c in prompt.chunks))
            timed, result = run_blended(self.engine, planner,
                                        replace(prompt, recompute_ratio=ratio), self.params,
                                        "blend", opts)
            stats = {"recomputed_tokens": result.recomputed_tokens}
            if result.matched is not None:
                used = [m for m in result.matched if m > 0]
                stats["variant_hit_rate"] = len(used) / max(1, len(prompt.chunks) - 1)
                stats["matched_context_chunks"] = sum(used) / max(1, len(used)) if used else 0
            return MethodRun(timed.ttft_s, timed.answer, None, _chunks_kv(result.kv, prompt),
                             stats)
        return run


def _chunks_kv(kv: KVBlocks, prompt: SegmentedPrompt) -> KVBlocks:
    """The KV of prefix + chunks (a question-aware blend's KV covers the question too)."""
    n = len(prompt.prefix) + prompt.num_chunk_tokens
    if kv.num_tokens == n:
        return kv
    blocks = kv.spec.num_blocks_for(n)
    data = kv.data[:, :, :blocks].clone()
    flat = data.view(kv.spec.num_layers, 2, -1, kv.spec.num_kv_heads, kv.spec.head_dim)
    flat[:, :, n:] = 0
    return KVBlocks(kv.spec, n, data)


def _ratio(name: str, text: str) -> float:
    try:
        ratio = float(text)
    except ValueError:
        raise SystemExit(f"error: {name!r}: the ratio after @ is not a number") from None
    if not 0 <= ratio <= 1:
        raise SystemExit(f"error: {name!r}: the ratio is not in [0, 1]")
    return ratio


def _options(name: str, modifiers: list[str], base: BlendOptions = CACHEBLEND) \
        -> tuple[BlendOptions, str, bool]:
    options, cache, per_chunk = base, "isolated", False
    for m in modifiers:
        if m.startswith("sink") and m[4:].isdigit():
            options = replace(options, sink_tokens=int(m[4:]))
        elif m == "neutral":
            cache = "neutral"
        elif m == "once":
            options = replace(options, gradual=False)
        elif m == "question":
            options = replace(options, question_aware=True)
        elif m == "rope16":
            options = replace(options, rope_fp32=False)
        elif m == "perchunk":
            per_chunk = True
        elif m == "qbudget":
            options = replace(options, question_aware=True, question_budgets=True)
        else:
            raise SystemExit(f"error: {name!r}: unknown modifier {m!r}")
    return options, cache, per_chunk

