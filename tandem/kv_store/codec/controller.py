"""`StreamingController`: per chunk, the best CacheGen level that arrives within its share of
the TTFT budget at the measured bandwidth, or recomputing the chunk from its text when that
is faster (CacheGen's controller, section 5.3).

Loading a chunk at level L takes size(L) / bandwidth; recomputing it takes its tokens / the
prefill rate. The controller picks the finest level that fits the budget, but recomputes
whenever that is both within budget and faster than loading (exact KV, less time). When
nothing fits it takes whichever is fastest. Bandwidth comes from `BandwidthMeter`, fed by
the previous transfers, as the paper measures it on the previous chunk.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

TEXT = "text"  # the choice to recompute a chunk from its tokens


@dataclass(frozen=True)
class Choice:
    option: str  # an encoding (e.g. "cachegen:2"), or TEXT
    seconds: float  # predicted time to load (or recompute) the chunk


class BandwidthMeter:
    """Bytes per second of recent transfers: an exponentially weighted average (thread-safe)."""

    def __init__(self, initial_bps: float, weight: float = 0.3) -> None:
        self.bps, self.weight = initial_bps, weight  # the guess holds until a first transfer
        self._measured = False
        self._lock = threading.Lock()

    def observe(self, num_bytes: int, seconds: float) -> None:
        if num_bytes <= 0 or seconds <= 0:
            return
        with self._lock:
            rate = num_bytes / seconds
            self.bps = self.bps + self.weight * (rate - self.bps) if self._measured else rate
            self._measured = True


class StreamingController:
    def __init__(self) -> None:
        self.choices: Counter[str] = Counter()  # option -> times chosen (for stats)
        self._lock = threading.Lock()

    def choose(self, bytes_per_token: dict[str, float], num_tokens: int, bandwidth_bps: float,
               budget_s: float, recompute_s_per_token: float | None = None) -> Choice:
        """`bytes_per_token`: the encodings available for the chunk, finest first, with their
        size per token; `recompute_s_per_token` None: recomputing is not an option."""
        options = [Choice(name, num_tokens * size / max(bandwidth_bps, 1.0))
                   for name, size in bytes_per_token.items()]
        fitting = [c for c in options if c.seconds <= budget_s]
        choice = fitting[0] if fitting else min(options, key=lambda c: c.seconds)
        if recompute_s_per_token is not None:
            text = Choice(TEXT, num_tokens * recompute_s_per_token)
            if text.seconds < choice.seconds and (text.seconds <= budget_s or not fitting):
                choice = text
        with self._lock:
            self.choices[choice.option] += 1
        return choice
