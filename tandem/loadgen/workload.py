"""Workloads: the requests of one load run, each with its arrival time, prompt and output length.

Both kinds follow from a seed, so two runs (or two server modes) see the same requests:

- synthetic: arrivals at `rate` requests/s, either a Poisson process (exponential gaps) or evenly
  spaced ("constant"); `rate=inf` sends everything at t=0. Prompt and output lengths are uniform
  in a `LengthRange` (a fixed length when its ends are equal).
- trace replay: a trace's rows (see `trace.py`) with arrivals divided by `rate_scale` (0.02 =
  2% of the trace's request rate, i.e. gaps 50x longer), cut to the rows whose scaled arrival
  falls in the first `duration_s` seconds and to the first `num_requests` of those, lengths
  clipped to what the served model can hold.

Prompts are token ids drawn uniformly from [1000, 40000): ordinary tokens, no special ones,
different for every request, so a prefix cache saves nothing. Sent with temperature 0 and
ignore_eos, each request generates exactly `max_tokens` tokens.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tandem.loadgen.trace import TraceRow

TOKEN_LOW, TOKEN_HIGH = 1000, 40000
Arrival = Literal["poisson", "constant"]
ARRIVALS: tuple[Arrival, ...] = ("poisson", "constant")


@dataclass(frozen=True)
class LengthRange:
    """Token lengths uniform in [low, high]; one fixed length when low == high."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"a length range needs 1 <= low <= high, got {self.low}-{self.high}")

    @classmethod
    def parse(cls, text: str) -> LengthRange:
        """Parse N (a fixed length) or LOW-HIGH (uniform), e.g. "512" or "100-2000"."""
        low, sep, high = text.strip().partition("-")
        try:
            return cls(int(low), int(high) if sep else int(low))
        except ValueError as e:
            raise ValueError(f"bad length {text!r}: want N or LOW-HIGH ({e})") from None

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True)
class Request:
    """One request to send `arrival_s` seconds after the run starts."""

    arrival_s: float
    prompt: list[int]
    max_tokens: int


@dataclass
class Workload:
    """Requests in arrival order, with a JSON-ready description of how they were made."""

    requests: list[Request]
    description: dict[str, Any]


# one shared int object per token id: a long replay's prompts then cost 8 bytes a token, not 36
_TOKEN_IDS = list(range(TOKEN_LOW, TOKEN_HIGH))


def random_prompt(rng: random.Random, length: int) -> list[int]:
    # randrange(n) draws exactly what randrange(TOKEN_LOW, TOKEN_HIGH) does, minus the offset
    width = len(_TOKEN_IDS)
    return [_TOKEN_IDS[rng.randrange(width)] for _ in range(length)]


def describe(requests: Sequence[Request], source: str) -> dict[str, Any]:
    """Lengths and offered load of a workload, whatever its source."""
    n = len(requests)
    span = requests[-1].arrival_s - requests[0].arrival_s
    prompt = [len(r.prompt) for r in requests]
    output = [r.max_tokens for r in requests]
    rate = (n - 1) / span if n > 1 and span > 0 else None
    return {
        "source": source,
        "num_requests": n,
        "arrival_span_s": round(span, 3),
        "offered_rate_req_s": rate,
        "prompt_tokens_min_mean_max": [min(prompt), sum(prompt) / n, max(prompt)],
        "output_tokens_min_mean_max": [min(output), sum(output) / n, max(output)],
        "offered_prompt_tok_s": None if rate is None else rate * sum(prompt) / n,
        "offered_output_tok_s": None if rate is None else rate * sum(output) / n,
    }


def synthetic_workload(
    *,
    num_requests: int | None,
    rate: float,
    prompt_len: LengthRange,
    output_len: LengthRange,
    arrival: Arrival = "poisson",
    duration_s: float | None = None,
    seed: int = 0,
) -> Workload:
    """Requests until `num_requests` are made or the next arrival is past `duration_s`."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (inf = all at once), got {rate}")
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}, got {arrival!r}")
    if num_requests is None and (duration_s is None or math.isinf(rate)):
        raise ValueError("a synthetic workload needs num_requests, or duration_s with a "
                         "finite rate")
    _check_limits(num_requests, duration_s)
    rng = random.Random(seed)
    requests: list[Request] = []
    at = 0.0
    while num_requests is None or len(requests) < num_requests:
        # draws in this order (gap, prompt length, output length, ids) keep seeded workloads
        # identical to those bench/serve.py made before this package existed
        if requests and not math.isinf(rate):
            at = len(requests) / rate if arrival == "constant" else at + rng.expovariate(rate)
        if duration_s is not None and at >= duration_s:
            break
        prompt_tokens = prompt_len.draw(rng)
        max_tokens = output_len.draw(rng)
        requests.append(Request(at, random_prompt(rng, prompt_tokens), max_tokens))
    if not requests:
        raise ValueError("the workload is empty")
    description = describe(requests, "synthetic")
    description.update(rate_req_s=rate if math.isfinite(rate) else "inf", arrival=arrival,
                       prompt_range=[prompt_len.low, prompt_len.high],
                       output_range=[output_len.low, output_len.high],
                       duration_s=duration_s, seed=seed)
    return Workload(requests, description)


def trace_workload(
    rows: Sequence[TraceRow],
    *,
    name: str = "trace",
    rate_scale: float = 1.0,
    duration_s: float | None = None,
    num_requests: int | None = None,
    min_prompt: int = 1,
    max_prompt: int | None = None,
    min_output: int = 1,
    max_output: int | None = None,
    seed: int = 0,
) -> Workload:
    """Replay `rows` (as `load_trace` returns them) at `rate_scale` times the trace's rate."""
    if not rate_scale > 0 or math.isinf(rate_scale):
        raise ValueError(f"rate_scale must be a positive finite number, got {rate_scale}")
    _check_limits(num_requests, duration_s)
    prompt_clip = LengthRange(min_prompt, max_prompt if max_prompt is not None else 2**62)
    output_clip = LengthRange(min_output, max_output if max_output is not None else 2**62)
    base = rows[0].arrival_s if rows else 0.0
    chosen: list[tuple[float, TraceRow]] = []
    for row in rows:
        at = (row.arrival_s - base) / rate_scale
        if duration_s is not None and at >= duration_s:
            break  # rows are in arrival order
        if num_requests is not None and len(chosen) == num_requests:
            break
        chosen.append((at, row))
    if not chosen:
        raise ValueError(f"{name}: no trace rows fall in the first {duration_s} s")
    rng = random.Random(seed)
    requests = [Request(at, random_prompt(rng, _clip(row.prompt_tokens, prompt_clip)),
                        _clip(row.output_tokens, output_clip)) for at, row in chosen]
    description = describe(requests, "trace")
    description.update(
        trace=name, trace_rows=len(rows), rate_scale=rate_scale, duration_s=duration_s,
        trace_span_s=round(chosen[-1][1].arrival_s - chosen[0][1].arrival_s, 3),
        prompt_clip=[min_prompt, max_prompt], output_clip=[min_output, max_output],
        prompts_clipped=sum(len(r.prompt) != row.prompt_tokens
                            for r, (_, row) in zip(requests, chosen, strict=True)),
        outputs_clipped=sum(r.max_tokens != row.output_tokens
                            for r, (_, row) in zip(requests, chosen, strict=True)),
        seed=seed)
    return Workload(requests, description)


def _clip(value: int, bounds: LengthRange) -> int:
    return min(max(value, bounds.low), bounds.high)


def _check_limits(num_requests: int | None, duration_s: float | None) -> None:
    if num_requests is not None and num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
