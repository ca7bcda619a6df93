"""CacheGen KV codec: size, quality and speed per level, against simple baselines.

One process, the shipped model (bf16, 22.5 KiB of KV per token) with one torch thread. The KV
of a 2,048-token context (the first tokens of `--text`, by default bench/data/harbour.txt) is
coded as eight 256-token chunks the way the store codes them (`encode_object` at first position
i x 256, so the sequence's first 4 tokens stay exact; `decode_object`), at every CacheGen level:

- Size: ratio_vs_bf16 = bf16 bytes of the context KV / the summed size of the 8 objects, all
  side information included (headers, per-layer checksums, sink tokens, escapes);
  bits_per_value is that size per KV value.
- Quality: the 256 tokens that follow the context are scored teacher-forced on top of the
  decoded context KV and on top of the exact one. ppl_increase_frac = ppl(decoded) /
  ppl(exact) - 1; kl = KL(exact || decoded) of the next-token distributions, averaged over the
  256 positions.
- Error: max_error is the level's documented worst case (max over layers and K|V of
  `codec.max_error`); the table also shows the largest |decoded - exact| measured, which
  includes the rounding of the decoded values to bf16.
- Speed: encode_mb_s / decode_mb_s = bf16 bytes of the chunks (MB = 10^6 bytes) / seconds to
  `encode_object` / `decode_object` all 8 of them, median of `--repeats`, after one warm-up
  chunk (building a level's entropy models is a one-time cost per process).

Baselines, on the same KV and scored the same way: int8 with a symmetric max-abs scale per
(layer, K|V, token) stored as fp16 (1 byte per value + 2 bytes per scale), and zstd (level 3)
on the raw bf16 bytes (lossless). prefill_tok_s: tokens per second of prefilling the context
(median of 2). decode_vs_prefill = (256 / prefill_tok_s) / (seconds to decode one chunk at the
default level): how much faster loading a chunk is than recomputing it.

`--compare` also estimates two other quantizers of the same KV, with the first 4 tokens exact
as in the codec: per-token max-abs scaling (CacheGen's public code: 32 bins for the keys of the
first third of the layers and the values of the first 2 layers, 16 otherwise; a 16-bit scale
per (layer, K|V, token)) and the paper's anchor/delta grouping (groups of 10 tokens within a
chunk; the anchor quantized per-token max-abs to 8 bits, the others as deltas from the decoded
anchor with step 0.5 x the RMS of that layer's K or V). Their size is the empirical entropy of
their symbols per (layer, K|V, channel) plus side information: an ideal adaptive coder with no
model cost, which flatters them.

Targets: a level with ratio >= 8 at a ppl increase <= 1%; decode >= 3x faster than prefill.

    python bench/codec.py [--json] [--repeats 3] [--text FILE] [--compare]

A table goes to stdout, progress to stderr; with `--json` the last line is one JSON object with
`levels` (each with `level`, `ratio_vs_bf16`, `ppl_increase_frac`, `encode_mb_s`,
`decode_mb_s`, `bits_per_value`, `kl`, `max_error`, `max_error_measured`), `int8_ratio`,
`int8_ppl_increase_frac`, `zstd_ratio`, `prefill_tok_s`, `decode_vs_prefill`, `ppl_exact` and,
with `--compare`, `compare` ({`per_token`, `anchor_delta`}: `bits_per_value`,
`ppl_increase_frac`, `kl`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import zstandard

from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.kv_cache import KVBlocks
from tandem.engine.sampling_params import SamplingParams
from tandem.kv_store.codec import DEFAULT_LEVEL, codec_for
from tandem.kv_store.codec.cachegen import LEVELS, CacheGenCodec
from tandem.kv_store.codec.profile import SINK_TOKENS
from tandem.kv_store.kv_object import decode_object, encode_object

CONTEXT, NEXT, CHUNK = 2048, 256, 256
PREFILLS = 2
ZSTD_LEVEL = 3
GROUP, DELTA_STEP = 10, 0.5  # anchor/delta: tokens per group, delta step x the part's RMS
TARGET_RATIO, TARGET_PPL, TARGET_SPEEDUP = 8.0, 0.01, 3.0
DEFAULT_TEXT = Path(__file__).parent / "data" / "harbour.txt"
ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0)
MIN_SCALE = 2.0**-24  # the smallest fp16 subnormal: a zero row keeps a usable scale


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Quality:
    ppl_increase_frac: float
    kl: float


@dataclass
class LevelResult:
    level: int
    ratio_vs_bf16: float
    ppl_increase_frac: float
    encode_mb_s: float
    decode_mb_s: float
    bits_per_value: float
    kl: float
    max_error: float
    max_error_measured: float
    decode_chunk_s: float


@dataclass
class Alternative:
    bits_per_value: float
    ppl_increase_frac: float
    kl: float


class Scorer:
    """Scores the `NEXT` tokens after the context teacher-forced on top of a context KV, and
    compares the result with the exact KV's."""

    def __init__(self, engine: LLMEngine, context: list[int], following: list[int],
                 exact: torch.Tensor) -> None:
        self.engine, self.ids = engine, context + following
        self.targets = torch.tensor(following)
        self.exact = self.log_probs(exact)
        self.exact_nll = self.nll(self.exact)

    def log_probs(self, data: torch.Tensor) -> torch.Tensor:
        """[NEXT, vocab] log-probs; row i predicts following[i] (`data`: the context KV)."""
        prefix = KVBlocks(self.engine.kv_spec, CONTEXT - 1, data)
        logits = self.engine.score(self.ids, prefix_kv=prefix)[:NEXT]
        return torch.log_softmax(logits.float(), dim=-1)

    def nll(self, log_probs: torch.Tensor) -> float:
        return -float(log_probs[torch.arange(NEXT), self.targets].mean())

    @property
    def ppl_exact(self) -> float:
        return math.exp(self.exact_nll)

    def quality(self, data: torch.Tensor) -> Quality:
        q = self.log_probs(data)
        kl = float((self.exact.exp() * (self.exact - q)).sum(dim=-1).mean())
        return Quality(math.exp(self.nll(q) - self.exact_nll) - 1, kl)


def load_text(engine: LLMEngine, path: Path) -> tuple[list[int], list[int]]:
    """The context and the tokens that follow it."""
    ids = engine.tokenizer.encode(path.read_text(encoding="utf-8"))
    if len(ids) < CONTEXT + NEXT:
        sys.exit(f"error: {path} is {len(ids)} tokens; it needs at least {CONTEXT + NEXT} "
                 f"(a {CONTEXT}-token context and the {NEXT} tokens scored after it)")
    return ids[:CONTEXT], ids[CONTEXT:CONTEXT + NEXT]


def prefill(engine: LLMEngine, ids: list[int]) -> tuple[KVBlocks, float]:
    """The prompt KV of `ids` and the seconds the prefill took."""
    start = time.perf_counter()
    engine.add_request("kv", ids, ONE_TOKEN, prefill_only=True)
    while not engine.step():
        pass
    elapsed = time.perf_counter() - start
    kv = engine.export_kv("kv")
    engine.release("kv")
    return kv, elapsed


def as_tokens(data: torch.Tensor) -> torch.Tensor:
    """Paged KV [layers, 2, blocks, block_size, heads, dim] -> float32 [layers, 2, tokens,
    channels]."""
    layers, parts, blocks, block_size, heads, dim = data.shape
    return data.reshape(layers, parts, blocks * block_size, heads * dim).float()


def as_blocks(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of `as_tokens`, in `like`'s dtype and shape."""
    return x.to(like.dtype).reshape(like.shape).contiguous()


def split(kv: KVBlocks) -> list[KVBlocks]:
    """The context KV as the store's `CHUNK`-token chunks."""
    per = CHUNK // kv.spec.block_size
    return [KVBlocks(kv.spec, CHUNK, kv.data[:, :, i * per:(i + 1) * per].contiguous())
            for i in range(kv.num_tokens // CHUNK)]


def measure_level(engine: LLMEngine, kv: KVBlocks, level: int, scorer: Scorer,
                  repeats: int) -> LevelResult:
    codec = codec_for(f"cachegen:{level}", engine.fingerprint)
    if not isinstance(codec, CacheGenCodec):
        raise TypeError(f"cachegen:{level} gave a {type(codec).__name__}")
    fingerprint, spec = engine.fingerprint, engine.kv_spec
    chunks = split(kv)
    decode_object(encode_object(chunks[0], fingerprint, codec, 0), fingerprint, spec)  # warm-up
    encodes, decodes = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        blobs = [encode_object(chunk, fingerprint, codec, i * CHUNK)
                 for i, chunk in enumerate(chunks)]
        encodes.append(time.perf_counter() - start)
        start = time.perf_counter()
        decoded = [decode_object(blob, fingerprint, spec) for blob in blobs]
        decodes.append(time.perf_counter() - start)
    data = torch.cat([d.data for d in decoded], dim=2)
    nbytes = kv.data.numel() * kv.data.element_size()
    size = sum(map(len, blobs))
    quality = scorer.quality(data)
    bound = max(codec.max_error(layer, part)
                for layer in range(spec.num_layers) for part in range(2))
    measured = float((as_tokens(data) - as_tokens(kv.data)).abs().max())
    encode_s, decode_s = statistics.median(encodes), statistics.median(decodes)
    return LevelResult(
        level=level, ratio_vs_bf16=nbytes / size, ppl_increase_frac=quality.ppl_increase_frac,
        encode_mb_s=nbytes / encode_s / 1e6, decode_mb_s=nbytes / decode_s / 1e6,
        bits_per_value=8 * size / kv.data.numel(), kl=quality.kl, max_error=bound,
        max_error_measured=measured, decode_chunk_s=decode_s / len(chunks))


# -- baselines ---------------------------------------------------------------------------------

def maxabs_quantize(x: torch.Tensor, limit: torch.Tensor | float) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization to integers in [-limit, limit], scaled by each row's
    max |x| (kept as fp16, as it would be stored). Returns (symbols, decoded values)."""
    amax = x.abs().amax(dim=-1, keepdim=True).clamp_min(MIN_SCALE).half().float()
    q = torch.round(x * limit / amax).clamp(-limit, limit)
    return q, q * amax / limit


def int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(decoded values, bytes): int8 values, one fp16 scale per (layer, K|V, token)."""
    _, decoded = maxabs_quantize(x, 127.0)
    return decoded, x.numel() + 2 * x[..., 0].numel()


def zstd_size(data: torch.Tensor) -> int:
    raw = data.contiguous().view(torch.uint8).numpy().tobytes()
    return len(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw))


# -- --compare: the quantizers the codec did not choose ----------------------------------------

def entropy_bits(symbols: torch.Tensor) -> float:
    """Bits to code `symbols` [layers, 2, n, channels] with an ideal coder per (layer, K|V,
    channel): n x the empirical entropy of each channel's symbols."""
    rows = symbols.permute(0, 1, 3, 2).reshape(-1, symbols.shape[2]).long()
    rows = rows - rows.min()
    width = int(rows.max()) + 1
    index = rows + torch.arange(rows.shape[0]).unsqueeze(1) * width
    counts = torch.bincount(index.reshape(-1), minlength=rows.shape[0] * width).double()
    counts = counts[counts > 0]
    return float(-(counts * torch.log2(counts / rows.shape[1])).sum())


def per_token_public(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """CacheGen's public quantizer, sinks exact: (decoded values, bits per value)."""
    layers, _, tokens, channels = x.shape
    bins = torch.full((layers, 2), 16)
    bins[:layers // 3, 0] = 32
    bins[:2, 1] = 32
    limit = (bins // 2 - 1).float().view(layers, 2, 1, 1)
    q, decoded = maxabs_quantize(x[:, :, SINK_TOKENS:], limit)
    out = x.clone()
    out[:, :, SINK_TOKENS:] = decoded
    bits = (entropy_bits(q) + 16 * layers * 2 * (tokens - SINK_TOKENS)
            + 16 * layers * 2 * SINK_TOKENS * channels)
    return out, bits / x.numel()


def anchor_delta(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The paper's grouping, sinks exact: (decoded values, bits per value). Each chunk's
    tokens (after the sinks) form groups of `GROUP`; the first of a group is its anchor."""
    layers, _, tokens, channels = x.shape
    position = torch.arange(tokens)
    start = (position // CHUNK * CHUNK).clamp_min(SINK_TOKENS)
    anchor = start + torch.div(position - start, GROUP, rounding_mode="floor") * GROUP
    body = position >= SINK_TOKENS
    is_anchor = body & (anchor == position)
    is_delta = body & ~is_anchor
    centred = x - x.mean(dim=2, keepdim=True)
    step = (DELTA_STEP * centred.pow(2).mean(dim=(2, 3), keepdim=True).sqrt()).half().float()
    out = x.clone()
    q_anchor, anchors = maxabs_quantize(x[:, :, is_anchor], 127.0)
    out[:, :, is_anchor] = anchors
    reference = out[:, :, anchor[is_delta]]
    q_delta = torch.round((x[:, :, is_delta] - reference) / step)
    out[:, :, is_delta] = reference + q_delta * step
    side = 16 * layers * 2 * (int(is_anchor.sum()) + 1)  # anchor scales, one step per part
    bits = (entropy_bits(q_anchor) + entropy_bits(q_delta) + side
            + 16 * layers * 2 * SINK_TOKENS * channels)
    return out, bits / x.numel()


def compare(kv: KVBlocks, scorer: Scorer) -> dict[str, Alternative]:
    x = as_tokens(kv.data)
    results = {}
    for name, quantizer in (("per_token", per_token_public), ("anchor_delta", anchor_delta)):
        log(f"--compare: {name}")
        decoded, bits = quantizer(x)
        quality = scorer.quality(as_blocks(decoded, kv.data))
        results[name] = Alternative(bits, quality.ppl_increase_frac, quality.kl)
    return results


# -- main --------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT,
                        help=f"text whose first {CONTEXT + NEXT} tokens are used "
                             "(default: bench/data/harbour.txt)")
    parser.add_argument("--compare", action="store_true",
                        help="also estimate per-token max-abs and anchor/delta quantizers")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    log("loading the model (bf16, 1 thread)")
    engine = LLMEngine(EngineConfig(num_threads=1, kv_cache_gb=0.5,
                                    enable_prefix_caching=False))
    context, following = load_text(engine, args.text)
    log(f"prefilling the {CONTEXT}-token context x {PREFILLS}")
    times = []
    for _ in range(PREFILLS):
        kv, elapsed = prefill(engine, context)
        times.append(elapsed)
    prefill_tok_s = CONTEXT / statistics.median(times)
    log(f"scoring the next {NEXT} tokens on the exact KV")
    scorer = Scorer(engine, context, following, kv.data)

    levels = []
    for level in LEVELS:
        log(f"cachegen:{level}: encode/decode of {CONTEXT // CHUNK} chunks x {args.repeats}, "
            "then scoring")
        levels.append(measure_level(engine, kv, level, scorer, args.repeats))

    log("baselines: int8 per token, zstd")
    x = as_tokens(kv.data)
    decoded, int8_bytes = int8_per_token(x)
    int8 = scorer.quality(as_blocks(decoded, kv.data))
    int8_error = float((decoded.to(kv.data.dtype).float() - x).abs().max())
    nbytes = kv.data.numel() * kv.data.element_size()
    default = next(r for r in levels if r.level == DEFAULT_LEVEL)
    results: dict[str, Any] = {
        "levels": levels,
        "int8_ratio": nbytes / int8_bytes,
        "int8_ppl_increase_frac": int8.ppl_increase_frac,
        "int8_kl": int8.kl,
        "int8_max_error_measured": int8_error,
        "zstd_ratio": nbytes / zstd_size(kv.data),
        "prefill_tok_s": prefill_tok_s,
        "decode_vs_prefill": NEXT / prefill_tok_s / default.decode_chunk_s,
        "ppl_exact": scorer.ppl_exact,
    }
    if args.compare:
        results["compare"] = compare(kv, scorer)
    report(results, args.text, nbytes)
    if args.json:
        print(json.dumps(rounded(results)))


def rounded(value: Any) -> Any:
    """`value` for JSON: dataclasses as objects, floats to 4 significant digits."""
    if isinstance(value, LevelResult | Alternative):
        value = asdict(value)
        value.pop("decode_chunk_s", None)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return value


def report(r: dict[str, Any], text: Path, nbytes: int) -> None:
    levels: list[LevelResult] = r["levels"]
    print(f"context: the first {CONTEXT} tokens of {text.name} ({nbytes / 2**20:.1f} MiB of bf16 "
          f"KV) as {CONTEXT // CHUNK} chunks; scored on the next {NEXT}: ppl {r['ppl_exact']:.3f} "
          f"exact; prefill {r['prefill_tok_s']:.0f} tok/s (1 thread)")
    print(f"{'codec':<13} {'ratio':>7} {'bits/val':>8} {'ppl':>8} {'KL':>8} {'max err':>8} "
          f"{'bound':>7} {'enc MB/s':>9} {'dec MB/s':>9}")
    for lv in levels:
        print(f"{'cachegen:' + str(lv.level):<13} {lv.ratio_vs_bf16:>6.2f}x "
              f"{lv.bits_per_value:>8.3f} {lv.ppl_increase_frac:>+8.2%} {lv.kl:>8.5f} "
              f"{lv.max_error_measured:>8.4f} {lv.max_error:>7.4f} {lv.encode_mb_s:>9.1f} "
              f"{lv.decode_mb_s:>9.1f}")
    print(f"{'int8/token':<13} {r['int8_ratio']:>6.2f}x {16 / r['int8_ratio']:>8.3f} "
          f"{r['int8_ppl_increase_frac']:>+8.2%} {r['int8_kl']:>8.5f} "
          f"{r['int8_max_error_measured']:>8.4f}")
    print(f"{f'zstd-{ZSTD_LEVEL}':<13} {r['zstd_ratio']:>6.2f}x {16 / r['zstd_ratio']:>8.3f} "
          f"{'lossless':>8}")
    alternatives: dict[str, Alternative] | None = r.get("compare")
    if alternatives:
        print("--compare (size = per-channel empirical entropy + side info; sinks exact):")
        for name, alt in alternatives.items():
            print(f"{name:<13} {16 / alt.bits_per_value:>6.2f}x {alt.bits_per_value:>8.3f} "
                  f"{alt.ppl_increase_frac:>+8.2%} {alt.kl:>8.5f}")

    good = [lv for lv in levels
            if lv.ratio_vs_bf16 >= TARGET_RATIO and lv.ppl_increase_frac <= TARGET_PPL]
    if good:
        best = max(good, key=lambda lv: lv.ratio_vs_bf16)
        verdict = (f"met by cachegen:{best.level} ({best.ratio_vs_bf16:.2f}x, "
                   f"{best.ppl_increase_frac:+.2%})")
    else:
        verdict = "MISSED"
    print(f"target ratio >= {TARGET_RATIO:g}x at ppl increase <= {TARGET_PPL:.0%}: {verdict}")
    default = next(lv for lv in levels if lv.level == DEFAULT_LEVEL)
    speedup = r["decode_vs_prefill"]
    print(f"target decode >= {TARGET_SPEEDUP:g}x faster than prefill: decoding a chunk at "
          f"cachegen:{DEFAULT_LEVEL} takes {default.decode_chunk_s * 1e3:.1f} ms, prefilling "
          f"{NEXT} tokens ~{NEXT / r['prefill_tok_s'] * 1e3:.0f} ms: {speedup:.1f}x, "
          + ("met" if speedup >= TARGET_SPEEDUP else "MISSED"))


if __name__ == "__main__":
    main()
