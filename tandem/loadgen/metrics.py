"""Statistics of a load run: latency percentiles, throughput, goodput and errors.

Latencies cover the successful requests only (a failed one has no meaningful TTFT): TTFT from
send to the first token event, TPOT (last token event - first) / (completion_tokens - 1) over
requests with at least two tokens, end-to-end from send to the stream's end. Percentiles
interpolate linearly between order statistics (numpy's default); with few requests p99 is
about the maximum, one slow request sets it.

Throughputs divide by the run's duration, from the first send to the last end: requests/s and
output tokens/s of successful requests, and total (prompt + output) tokens/s. Goodput is the
requests/s that succeeded and met every SLO given: TTFT <= `ttft_s` and TPOT <= `tpot_s` (a
one-token request has no TPOT and meets any TPOT SLO); it is None when no SLO is set.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tandem.loadgen.backend import RequestResult


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None without data."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class LatencyStats:
    """Mean and percentiles of one latency, seconds; None without samples."""

    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> LatencyStats:
        mean = sum(values) / len(values) if values else None
        return cls(mean, percentile(values, 50), percentile(values, 90), percentile(values, 99))


@dataclass(frozen=True)
class Slo:
    """Service-level objectives in seconds; None = no objective."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    @property
    def is_set(self) -> bool:
        return self.ttft_s is not None or self.tpot_s is not None

    def met_by(self, result: RequestResult) -> bool:
        if not result.ok:
            return False
        ttft, tpot = result.ttft_s, result.tpot_s
        if self.ttft_s is not None and (ttft is None or ttft > self.ttft_s):
            return False
        return self.tpot_s is None or tpot is None or tpot <= self.tpot_s


@dataclass(frozen=True)
class Summary:
    """What `tandem bench` reports; `to_dict` flattens it into the JSON keys."""

    requests: int
    completed: int
    failed: int
    error_codes: dict[str, int]
    wrong_length: int  # successful requests that generated other than max_tokens tokens
    duration_s: float
    prompt_tokens: int
    completion_tokens: int
    request_throughput: float | None  # req/s
    output_throughput: float | None  # tok/s
    total_token_throughput: float | None  # tok/s
    good_requests: int | None
    goodput: float | None  # req/s
    slo: Slo
    ttft: LatencyStats
    tpot: LatencyStats
    e2e: LatencyStats

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.requests,
            "completed": self.completed,
            "failed": self.failed,
            "error_codes": dict(self.error_codes),
            "wrong_length": self.wrong_length,
            "duration_s": self.duration_s,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "request_throughput_req_s": self.request_throughput,
            "output_throughput_tok_s": self.output_throughput,
            "total_token_throughput_tok_s": self.total_token_throughput,
            "good_requests": self.good_requests,
            "goodput_req_s": self.goodput,
            "slo_ttft_s": self.slo.ttft_s,
            "slo_tpot_s": self.slo.tpot_s,
        }
        for name, stats in (("ttft", self.ttft), ("tpot", self.tpot), ("e2e", self.e2e)):
            for stat in ("mean", "p50", "p90", "p99"):
                out[f"{name}_{stat}_s"] = getattr(stats, stat)
        return out


def summarize(results: Sequence[RequestResult], slo: Slo | None = None) -> Summary:
    """The statistics of one run's results."""
    slo = slo or Slo()
    ok = [r for r in results if r.ok]
    duration = (max(r.end for r in results) - min(r.send for r in results)) if results else 0.0
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    completion_tokens = sum(r.completion_tokens for r in ok)
    good = sum(slo.met_by(r) for r in results) if slo.is_set else None

    def per_second(count: int | None) -> float | None:
        return None if count is None or duration <= 0 else count / duration

    return Summary(
        requests=len(results),
        completed=len(ok),
        failed=len(results) - len(ok),
        error_codes=dict(Counter(r.error_code for r in results if r.error_code is not None)),
        wrong_length=sum(r.completion_tokens != r.expected_tokens for r in ok),
        duration_s=duration,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        request_throughput=per_second(len(ok)),
        output_throughput=per_second(completion_tokens),
        total_token_throughput=per_second(prompt_tokens + completion_tokens),
        good_requests=good,
        goodput=per_second(good),
        slo=slo,
        ttft=LatencyStats.of([t for r in ok if (t := r.ttft_s) is not None]),
        tpot=LatencyStats.of([t for r in ok if (t := r.tpot_s) is not None]),
        e2e=LatencyStats.of([r.e2e_s for r in ok]),
    )
