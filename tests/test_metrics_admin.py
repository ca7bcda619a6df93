"""`/metrics` (parsed with prometheus_client's own parser), the Admin service's `Status` and
`tandem status`, against the session's real cluster."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from tandem.cli import app
from tandem.client import Client

pytestmark = pytest.mark.slow


def scrape(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.http_url + "/metrics", timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    """A sample's value; labels not given are summed over."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == want for k, want in labels.items()))


def test_metrics_counters_and_histograms_move_by_the_right_amounts(server):
    prompt = list(range(1000, 1037))  # 37 token ids: 3 blocks of 16 on the decode worker
    before = scrape(server)
    with Client(server.address, timeout=120) as client:
        out = client.generate(prompt, max_tokens=5, temperature=0, ignore_eos=True)
    assert out.usage.completion_tokens == 5
    after = scrape(server)

    def moved(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("tandem:prompt_tokens_total") == 37
    assert moved("tandem:generation_tokens_total") == 5
    assert moved("tandem:request_success_total", finished_reason="length") == 1
    assert moved("tandem:time_to_first_token_seconds_count") == 1
    assert moved("tandem:e2e_request_latency_seconds_count") == 1
    assert moved("tandem:request_queue_time_seconds_count") == 1
    assert moved("tandem:request_prefill_time_seconds_count") == 1
    assert moved("tandem:inter_token_latency_seconds_count") == 4
    assert moved("tandem:request_prompt_tokens_sum") == 37
    assert moved("tandem:request_generation_tokens_sum") == 5
    assert moved("tandem:prefix_cache_queries_total") == 37
    assert moved("tandem:prefix_cache_hits_total") == out.usage.cached_tokens
    handoff = moved("tandem:kv_handoff_bytes_total")
    assert handoff > 0 and handoff % 3 == 0  # three equal blocks
    assert moved("tandem:kv_handoff_seconds_count") == 1
    assert value(after, "tandem:e2e_request_latency_seconds_sum") > \
        value(before, "tandem:e2e_request_latency_seconds_sum")


def test_metrics_carry_worker_figures_with_bounded_labels(server):
    server.run(server.server.monitor.refresh())
    samples = scrape(server)
    usage = {dict(ls)["worker"]: v for (n, ls), v in samples.items()
             if n == "tandem:kv_cache_usage_perc"}
    assert len(usage) == 2 and all(0 <= v <= 1 for v in usage.values())
    assert value(samples, "tandem:pool_workers", role="prefill") == 1
    assert value(samples, "tandem:pool_workers", role="decode") == 1
    assert ("tandem:kv_store_hits_total", (("model_name", "smollm2-135m-instruct"),
                                           ("tier", "cpu"))) in samples
    for _, labels in samples:  # nothing per request or per chunk
        assert not {k for k, _ in labels} & {"request_id", "chunk", "key"}


def test_admin_status_lists_every_worker(server):
    server.run(server.server.monitor.refresh())
    with Client(server.address, timeout=30) as client:
        status = client.status()
    assert {p.role: (p.workers, p.ready) for p in status.pools} == \
        {"prefill": (1, 1), "decode": (1, 1)}
    ids = [w.id for w in status.workers]
    assert len(set(ids)) == 2 and all("@" in i for i in ids)
    decode = next(w for w in status.workers if w.role == "decode")
    assert decode.state == "ready" and 0 <= decode.kv_cache_usage <= 1
    prefill = next(w for w in status.workers if w.role == "prefill")
    assert {t.tier for t in prefill.tiers} >= {"cpu"}


def test_tandem_status_shows_every_worker(server):
    server.run(server.server.monitor.refresh())
    result = CliRunner().invoke(app, ["status", "--address", server.address])
    assert result.exit_code == 0, result.output
    with Client(server.address, timeout=30) as client:
        for worker in client.status().workers:
            assert worker.id in result.output
    result = CliRunner().invoke(app, ["status", "--address", server.address, "--json"])
    assert len(json.loads(result.output.strip().splitlines()[-1])["workers"]) == 2


def test_health_is_open_and_answers_ok(server):
    r = httpx.get(server.http_url + "/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
