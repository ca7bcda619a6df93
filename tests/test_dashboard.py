"""The Grafana dashboard shipped with the Helm chart matches the metrics Tandem exports.

Every metric a panel queries must be registered by `ClusterMetrics`, every registered family must
have a panel, and each category's row must chart its families. Read from the registry, not a live
scrape: no cluster needed.
"""

from __future__ import annotations

import json
import re
from functools import cache
from itertools import combinations
from pathlib import Path

import pytest

from tandem.cluster.metrics import ClusterMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "helm" / "tandem" / "dashboards" / "tandem.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MODEL_SELECTOR = '{model_name=~"$model_name"'
METRIC = re.compile(r"tandem:[A-Za-z_:][A-Za-z0-9_:]*")
UNITS = {"s", "ms", "bytes", "Bps", "percentunit", "reqps", "ops", "short", "none"}
GRID_WIDTH = 24

# Row title -> the metric families (registry names) the panels of that row must chart.
CATEGORIES: dict[str, set[str]] = {
    "Request latency": {"time_to_first_token_seconds", "inter_token_latency_seconds",
                        "e2e_request_latency_seconds", "request_queue_time_seconds",
                        "request_prefill_time_seconds"},
    "Tokens": {"request_prompt_tokens", "request_generation_tokens", "prompt_tokens",
               "generation_tokens"},
    "Requests": {"request_success", "request_failure", "request_resumed", "request_migrated"},
    "Scheduler": {"num_requests_running", "num_requests_waiting"},
    "KV cache": {"kv_cache_usage_perc"},
    "Prefix cache": {"prefix_cache_hits", "prefix_cache_queries"},
    "KV store": {"kv_store_hits", "kv_store_misses", "kv_store_read_bytes",
                 "kv_store_written_bytes", "kv_store_used_bytes", "kv_store_evictions",
                 "kv_store_corrupt_objects"},
    "KV handoff": {"kv_handoff_bytes", "kv_handoff_seconds"},
    "CacheGen": {"cachegen_level_choices"},
    "CacheBlend": {"blend_recomputed_tokens", "blend_reused_tokens", "chunk_cache_blends",
                   "chunk_cache_chunk_hits", "chunk_cache_variant_hits",
                   "chunk_cache_matched_context_chunks", "chunk_cache_recomputed_tokens",
                   "chunk_cache_saved_tokens", "chunk_cache_captured", "chunk_cache_cold"},
    "Pools": {"pool_workers"},
    "Attention offload": {"attention_offloaded_sequences", "attention_offloaded_requests",
                          "attention_offload_steps", "attention_channel_bytes",
                          "attention_layer_round_trip_seconds", "attention_pipeline_overlap",
                          "attention_kv_held_bytes"},
    "Autoscaling": {"requests_received", "prompt_tokens_received", "autoscale_desired_replicas",
                    "autoscale_decisions"},
}
CATEGORIES = {row: {"tandem:" + name for name in names} for row, names in CATEGORIES.items()}


@cache
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@cache
def metrics() -> ClusterMetrics:
    return ClusterMetrics("m")


@cache
def series_families() -> dict[str, str]:
    """Series name a query can select -> its family, as Prometheus scrapes them."""
    out: dict[str, str] = {}
    for family in metrics().registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        for suffix in suffixes.get(family.type, ("",)):
            out[family.name + suffix] = family.name
    return out


def all_panels() -> list[dict]:
    """Every panel, rows included, with the panels nested in collapsed rows."""
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def charts() -> list[dict]:
    return [p for p in all_panels() if p["type"] != "row"]


def exprs(panel: dict) -> list[str]:
    return [t["expr"] for t in panel.get("targets", []) if t.get("expr")]


def names_in(panel: dict) -> set[str]:
    return {name for expr in exprs(panel) for name in METRIC.findall(expr)}


def families_in(panel: dict) -> set[str]:
    known = series_families()
    return {known[name] for name in names_in(panel) if name in known}


def rows() -> dict[str, list[dict]]:
    """Row title -> the panels it holds: nested when collapsed, else those below it."""
    out: dict[str, list[dict]] = {}
    current: list[dict] | None = None
    top = sorted(dashboard()["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    for panel in top:
        if panel["type"] == "row":
            assert panel["title"] not in out, f"two rows titled {panel['title']!r}"
            current = out[panel["title"]] = list(panel.get("panels", []))
        elif current is not None:
            current.append(panel)
    return out


def test_dashboard_parses_with_identity():
    d = dashboard()
    assert d["uid"] == "tandem-overview"
    assert d["title"] == "Tandem"
    assert d["schemaVersion"] >= 36
    assert d["panels"] and charts()


def test_panel_ids_unique():
    ids = [p["id"] for p in all_panels()]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def _overlap(a: dict, b: dict) -> bool:
    return (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])


def test_grid_positions_fit_and_do_not_overlap():
    layers = [dashboard()["panels"]]  # the top level, then each collapsed row's own panels
    layers += [p["panels"] for p in dashboard()["panels"] if p.get("panels")]
    for layer in layers:
        for panel in layer:
            g = panel["gridPos"]
            assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0, panel["title"]
            assert g["x"] + g["w"] <= GRID_WIDTH, panel["title"]
        for a, b in combinations(layer, 2):
            assert not _overlap(a["gridPos"], b["gridPos"]), (a["title"], b["title"])


def test_template_variables():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    model = variables["model_name"]
    assert model["type"] == "query"
    assert model["datasource"] == DATASOURCE
    query = model["query"]["query"] if isinstance(model["query"], dict) else model["query"]
    assert query == "label_values(tandem:request_success_total, model_name)"
    assert METRIC.findall(query)[0] in series_families()


def test_panels_use_the_datasource_variable_and_units():
    for panel in charts():
        assert panel["type"] in {"timeseries", "stat", "bargauge"}, panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"] in UNITS, panel["title"]


def test_expressions_have_balanced_brackets():
    pairs = {")": "(", "]": "[", "}": "{"}
    for panel in charts():
        for expr in exprs(panel):
            stack: list[str] = []
            for char in expr.replace('"$model_name"', ""):
                if char in "([{":
                    stack.append(char)
                elif char in pairs:
                    assert stack and stack.pop() == pairs[char], (panel["title"], expr)
            assert not stack, (panel["title"], expr)


def test_every_selector_filters_by_model():
    for panel in charts():
        for expr in exprs(panel):
            for match in METRIC.finditer(expr):
                rest = expr[match.end():]
                assert rest.startswith(MODEL_SELECTOR), (panel["title"], match.group())


def test_every_queried_metric_is_registered():
    registered = metrics().family_names()
    scraped = series_families()
    for panel in charts():
        for name in names_in(panel):
            assert name in registered, f"{panel['title']!r} queries unknown {name}"
            # A bare counter or histogram family name is registered but never scraped.
            assert name in scraped, f"{panel['title']!r} queries {name}, which has no series"


def test_every_registered_family_has_a_panel():
    used = set().union(*(families_in(p) for p in charts()))
    families = {f.name for f in metrics().registry.collect()}
    assert families - used == set(), "families without a panel"


def test_categories_cover_the_registry():
    families = {f.name for f in metrics().registry.collect()}
    categorised = set().union(*CATEGORIES.values())
    assert categorised - families == set(), "categories name families that do not exist"
    assert families - categorised == set(), "new families: add them to a category and its row"


@pytest.mark.parametrize("row", sorted(CATEGORIES))
def test_each_category_row_charts_its_families(row):
    held = rows()
    assert row in held, f"no row titled {row!r}"
    panels = [p for p in held[row] if p["type"] != "row"]
    assert panels, f"row {row!r} is empty"
    used = set().union(*(families_in(p) for p in panels))
    assert CATEGORIES[row] - used == set(), f"row {row!r} misses families"


def test_latency_rows_show_percentiles():
    for family in CATEGORIES["Request latency"]:
        bucket = family + "_bucket"
        quantiles = {float(q) for p in charts() for e in exprs(p)
                     for q in re.findall(r"histogram_quantile\(([0-9.]+), sum by \([^)]*\) "
                                         r"\(rate\(" + re.escape(bucket), e)}
        assert {0.5, 0.9, 0.99} <= quantiles, family
