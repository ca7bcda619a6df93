"""The output of `tandem bench`: rich tables on stdout and, on request, one JSON line.

The JSON object is `Summary.to_dict()` (flat keys such as `ttft_p99_s`, `goodput_req_s`,
`error_codes`) plus `backend`, `target`, `model`, `max_concurrency`, `warmup` and `workload`
(the workload's description: source, lengths, offered rate, and for a trace its scaling).
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from tandem.loadgen.metrics import LatencyStats, Summary


def build_report(summary: Summary, workload: dict[str, Any], **context: Any) -> dict[str, Any]:
    """The JSON report: the run's context (backend, model, ...), its summary and its workload."""
    return {**context, **summary.to_dict(), "workload": workload}


def json_line(report: dict[str, Any]) -> str:
    """One line of strict JSON (no NaN or Infinity, which many parsers reject)."""
    return json.dumps(report, allow_nan=False, separators=(",", ":"))


def print_tables(report: dict[str, Any], summary: Summary,
                 console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"tandem bench: {report.get('backend')} {report.get('target')}, model "
                  f"{report.get('model')}", highlight=False)
    w = report["workload"]
    p_lo, p_mean, p_hi = w["prompt_tokens_min_mean_max"]
    o_lo, o_mean, o_hi = w["output_tokens_min_mean_max"]
    console.print(
        f"{w['source']} workload: {w['num_requests']} requests over {w['arrival_span_s']:.1f} s "
        f"({_fmt(w['offered_rate_req_s'], '.3f')} req/s offered), prompts {p_lo}-{p_hi} "
        f"(mean {p_mean:.0f}), outputs {o_lo}-{o_hi} (mean {o_mean:.0f}) tokens", highlight=False)
    if w["source"] == "trace":
        console.print(
            f"trace {w['trace']}: rate x{w['rate_scale']:g}, first {w['num_requests']} of "
            f"{w['trace_rows']} rows ({w['trace_span_s']:.1f} s of trace), "
            f"{w['prompts_clipped']} prompts and {w['outputs_clipped']} outputs clipped",
            highlight=False)

    s = summary
    totals = Table(title="Results", show_header=False)
    totals.add_column("metric")
    totals.add_column("value", justify="right")
    totals.add_row("Successful requests", f"{s.completed}/{s.requests}")
    totals.add_row("Benchmark duration (s)", f"{s.duration_s:.2f}")
    totals.add_row("Prompt / output tokens", f"{s.prompt_tokens} / {s.completion_tokens}")
    totals.add_row("Request throughput (req/s)", _fmt(s.request_throughput, ".3f"))
    totals.add_row("Output token throughput (tok/s)", _fmt(s.output_throughput, ".1f"))
    totals.add_row("Total token throughput (tok/s)", _fmt(s.total_token_throughput, ".1f"))
    if s.slo.is_set:
        terms = [f"TTFT <= {s.slo.ttft_s:g} s" if s.slo.ttft_s is not None else "",
                 f"TPOT <= {s.slo.tpot_s:g} s" if s.slo.tpot_s is not None else ""]
        totals.add_row(f"Goodput (req/s; {', '.join(t for t in terms if t)})",
                       f"{_fmt(s.goodput, '.3f')} ({s.good_requests} requests)")
    if report.get("max_concurrency") is not None:
        totals.add_row("Max concurrency", str(report["max_concurrency"]))
    for code, count in sorted(s.error_codes.items()):
        totals.add_row(f"Failed: {code}", str(count))
    if s.wrong_length:
        totals.add_row("Other length than max_tokens", str(s.wrong_length))
    console.print(totals)

    latency = Table(title="Latency (ms)")
    latency.add_column("metric")
    for stat in ("mean", "p50", "p90", "p99"):
        latency.add_column(stat, justify="right")
    for name, stats in (("TTFT", s.ttft), ("TPOT", s.tpot), ("E2E", s.e2e)):
        latency.add_row(name, *_ms(stats))
    console.print(latency)


def _ms(stats: LatencyStats) -> list[str]:
    return [_fmt(v, ".1f", 1e3) for v in (stats.mean, stats.p50, stats.p90, stats.p99)]


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)
