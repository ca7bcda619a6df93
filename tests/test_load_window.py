"""The autoscaler's metrics window: Prometheus-style quantiles from bucket counts, and rates
differenced between samples of the gateway's own registry."""

from __future__ import annotations

import math

import pytest
from prometheus_client import generate_latest

from tandem.cluster.load_window import (
    LoadWindow,
    histogram_quantile,
    parse_families,
    read_families,
)
from tandem.cluster.metrics import ClusterMetrics


def test_histogram_quantile_interpolates_within_the_bucket_like_prometheus():
    buckets = {0.1: 10.0, 0.5: 30.0, 1.0: 40.0, math.inf: 40.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * 10 / 20)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1 * 1.0)
    assert histogram_quantile(0.9, buckets) == pytest.approx(0.5 + 0.5 * 6 / 10)
    assert histogram_quantile(0.99, {1.0: 1.0, math.inf: 3.0}) == 1.0  # past the last bound
    assert histogram_quantile(0.5, {1.0: 0.0, math.inf: 0.0}) is None


def test_the_window_reports_rates_and_quantiles_of_the_last_interval_only():
    metrics = ClusterMetrics("m")
    window = LoadWindow(lambda: read_families(metrics.registry), percentile=90)
    first = window.sample(0.0, {"prefill": 0}, 0.0)
    assert first.arrival_rate == 0 and first.ttft_s is None
    for _ in range(20):  # before the interval: must not count
        metrics.labels(metrics.requests_received).inc()
        metrics.labels(metrics.ttft).observe(9.0)
    window.sample(10.0, {}, 0.0)
    for _ in range(30):
        metrics.labels(metrics.requests_received).inc()
        metrics.labels(metrics.prompt_tokens_received).inc(100)
        metrics.labels(metrics.generation_tokens).inc(10)
        metrics.labels(metrics.ttft).observe(0.2)
    sample = window.sample(20.0, {"prefill": 3}, 0.5)
    assert sample.arrival_rate == pytest.approx(3.0)
    assert sample.prompt_tokens_rate == pytest.approx(300.0)
    assert sample.output_tokens_rate == pytest.approx(30.0)
    assert sample.ttft_s is not None and sample.ttft_s < 0.5
    assert sample.queue_depth == {"prefill": 3} and sample.kv_use == 0.5


def test_the_metrics_page_reads_the_same_as_the_registry():
    """The operator reads `/metrics` over HTTP; the in-head loop reads the registry."""
    metrics = ClusterMetrics("m")
    for value in (0.05, 0.3, 2.5):
        metrics.labels(metrics.requests_received).inc()
        metrics.labels(metrics.ttft).observe(value)
    page = parse_families(generate_latest(metrics.registry).decode())
    direct = read_families(metrics.registry)
    for key in ("tandem:requests_received_total",
                *(k for k in direct if k.startswith("tandem:time_to_first_token_seconds_b"))):
        assert page[key] == pytest.approx(direct[key]), key
