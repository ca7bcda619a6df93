"""The simulated load: arrival times and prompt and output lengths, as numpy arrays.

From a trace (the shipped Azure traces by name, or a CSV by path), optionally replicated K
times with each copy's arrival jittered uniformly within one second, so the trace's bursts keep
their shape at K times the rate; or synthetic (Poisson arrivals, lengths drawn from a trace or
fixed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tandem.loadgen.trace import load_trace

JITTER_S = 1.0


@dataclass(frozen=True)
class Workload:
    arrival_s: np.ndarray  # sorted, seconds
    prompt: np.ndarray  # tokens (int64)
    output: np.ndarray  # tokens (int64), at least 1

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if not (len(self.prompt) == len(self.output) == n):
            raise ValueError("workload: arrival, prompt and output differ in length")
        if n == 0:
            raise ValueError("workload: no requests")
        if (np.diff(self.arrival_s) < 0).any():
            raise ValueError("workload: arrivals are not sorted")
        if (self.prompt < 1).any() or (self.output < 1).any():
            raise ValueError("workload: every request needs a prompt and an output token")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0])

    def window(self, start_s: float, end_s: float) -> Workload:
        """The requests arriving in [start_s, end_s), re-based to start at 0."""
        keep = (self.arrival_s >= start_s) & (self.arrival_s < end_s)
        if not keep.any():
            raise ValueError(f"workload: no request arrives in [{start_s}, {end_s}) s")
        return Workload(self.arrival_s[keep] - start_s, self.prompt[keep], self.output[keep])


def from_trace(name_or_path: str, copies: int = 1, seed: int = 0) -> Workload:
    rows = load_trace(name_or_path)
    arrival = np.array([r.arrival_s for r in rows], float)
    prompt = np.maximum(np.array([r.prompt_tokens for r in rows], np.int64), 1)
    output = np.maximum(np.array([r.output_tokens for r in rows], np.int64), 1)
    return replicate(Workload(arrival, prompt, output), copies, seed)


def replicate(workload: Workload, copies: int, seed: int = 0) -> Workload:
    """Each request `copies` times; every copy but the first arrives up to `JITTER_S` later."""
    if copies < 1:
        raise ValueError(f"copies must be at least 1, not {copies}")
    if copies == 1:
        return workload
    rng = np.random.default_rng(seed)
    arrival = np.repeat(workload.arrival_s, copies)
    jitter = rng.uniform(0.0, JITTER_S, arrival.size)
    jitter[::copies] = 0.0
    arrival = arrival + jitter
    order = np.argsort(arrival, kind="stable")
    return Workload(arrival[order], np.repeat(workload.prompt, copies)[order],
                    np.repeat(workload.output, copies)[order])


def synthetic(rate: float, duration_s: float, prompt: int, output: int,
              seed: int = 0) -> Workload:
    """Poisson arrivals at `rate` per second with fixed lengths."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("synthetic load needs a positive rate and duration")
    rng = np.random.default_rng(seed)
    n = max(1, rng.poisson(rate * duration_s))
    arrival = np.sort(rng.uniform(0.0, duration_s, n))
    return Workload(arrival, np.full(n, prompt, np.int64), np.full(n, output, np.int64))
