"""One `LoadSample` per autoscaling interval, from the gateway's own metric families: the same
counters and histograms the operator reads from `/metrics`, differenced between samples."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Metric
from prometheus_client.parser import text_string_to_metric_families

from tandem.cluster.autoscaler import LoadSample

PREFIX = "tandem:"


def summed_families(families: Iterable[Metric]) -> dict[str, float]:
    """Every sample summed over its labels but `le` (see `read_families`)."""
    out: dict[str, float] = defaultdict(float)
    for family in families:
        for s in family.samples:
            key = f"{s.name}:{float(s.labels['le'])}" if s.name.endswith("_bucket") else s.name
            out[key] += s.value
    return out


def read_families(registry: CollectorRegistry) -> dict[str, float]:
    """Every sample summed over its labels but `le`: counter totals and histogram buckets
    (keyed "<name>_bucket:<le>")."""
    return summed_families(registry.collect())


def parse_families(text: str) -> dict[str, float]:
    """The same, from a `/metrics` page (Prometheus' text format), as the operator reads it."""
    return summed_families(text_string_to_metric_families(text))


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative bucket counts {upper bound: count}:
    linear within the bucket the rank falls in; None with no observation."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return previous_bound  # past the last finite bucket: its bound
            width = count - previous_count
            share = (rank - previous_count) / width if width > 0 else 1.0
            return previous_bound + (bound - previous_bound) * share
        previous_bound, previous_count = bound, count
    return previous_bound


class LoadWindow:
    """Differences of the gateway's counters between calls, as `LoadSample`s."""

    def __init__(self, read: Callable[[], dict[str, float]] | None = None,
                 percentile: float = 90.0) -> None:
        self.read, self.quantile = read, percentile / 100
        self._last: tuple[float, dict[str, float]] | None = None

    def sample(self, now: float, queue_depth: dict[str, int], kv_use: float,
               values: dict[str, float] | None = None) -> LoadSample:
        """The interval since the last call; `values` when the caller has read them already."""
        if values is None:
            if self.read is None:
                raise ValueError("LoadWindow.sample: no values given and nothing to read them from")
            values = self.read()
        last_at, last = self._last if self._last is not None else (now, values)
        self._last = (now, values)
        span = max(now - last_at, 1e-9)

        def rate(name: str) -> float:
            key = f"{PREFIX}{name}_total"
            return max(values.get(key, 0.0) - last.get(key, 0.0), 0.0) / span

        def quantile(name: str) -> float | None:
            prefix = f"{PREFIX}{name}_bucket:"
            buckets = {float(k[len(prefix):]): values[k] - last.get(k, 0.0)
                       for k in values if k.startswith(prefix)}
            return histogram_quantile(self.quantile, buckets)

        if last is values:  # the first call: no interval yet
            return LoadSample(now, 0.0, 0.0, 0.0, queue_depth, None, None, kv_use)
        return LoadSample(
            at=now, arrival_rate=rate("requests_received"),
            prompt_tokens_rate=rate("prompt_tokens_received"),
            output_tokens_rate=rate("generation_tokens"), queue_depth=queue_depth,
            ttft_s=quantile("time_to_first_token_seconds"),
            itl_s=quantile("inter_token_latency_seconds"), kv_use=kv_use)
