"""The report of bench/serve.py: per-mode statistics, the JSON object and the table."""

from __future__ import annotations

import argparse
import os
from typing import Any

from tandem.loadgen import RequestResult, Workload, percentile, summarize

MODES = ("disagg", "coloc")
MODE_LABELS = {"disagg": "disagg 1P+1D", "coloc": "coloc 2x(P+D)"}
BUSY_WARNING = 0.25  # machine CPU busy fraction before the run that triggers a warning


def summarize_mode(mode: str, results: list[RequestResult], wall: dict[str, float],
                   cpu_busy: float | None, client_cpu: float) -> dict[str, Any]:
    """The `{mode}_*` keys of the report: tandem.loadgen's statistics plus the gateway's timings."""
    s = summarize(results)
    timings = [r.timings for r in results if r.ok and r.timings is not None]
    # prefill_s and handoff_s are 0 where no prefill worker took part (colocated): not measured
    staged = [t for t in timings if t.prefill_s > 0]
    prefill = [t.prefill_s for t in staged]
    handoff = [t.handoff_s for t in staged]
    out: dict[str, Any] = {
        "requests": s.requests,
        "ok": s.completed,
        "errors": s.failed,
        "error_codes": s.error_codes,
        "wrong_length": s.wrong_length,
        "completion_tokens": s.completion_tokens,
        "ttft_p50_s": s.ttft.p50,
        "ttft_p99_s": s.ttft.p99,
        "ttft_mean_s": s.ttft.mean,
        "tpot_p50_s": s.tpot.p50,
        "tpot_p99_s": s.tpot.p99,
        "throughput_tok_s": s.output_throughput,
        "run_s": s.duration_s,
        "server_ttft_p50_s": percentile([t.ttft_s for t in timings], 50),
        "server_ttft_p99_s": percentile([t.ttft_s for t in timings], 99),
        "queue_p50_s": percentile([t.queue_s for t in timings], 50),
        "prefill_p50_s": percentile(prefill, 50),
        "handoff_p50_s": percentile(handoff, 50),
        "handoff_frac": sum(handoff) / sum(prefill) if prefill else None,
        "handoff_frac_median": percentile(
            [h / p for h, p in zip(handoff, prefill, strict=True)], 50),
        "cpu_busy": cpu_busy,
        "client_cpu_share": client_cpu,
        **{f"{name}_s": round(value, 2) for name, value in wall.items()},
    }
    return {f"{mode}_{key}": value for key, value in out.items()}


REPORT_KEYS = ("requests", "ok", "errors", "error_codes", "wrong_length", "completion_tokens",
               "ttft_p50_s", "ttft_p99_s", "ttft_mean_s", "tpot_p50_s", "tpot_p99_s",
               "throughput_tok_s", "run_s", "server_ttft_p50_s", "server_ttft_p99_s",
               "queue_p50_s", "prefill_p50_s", "handoff_p50_s", "handoff_frac",
               "handoff_frac_median", "cpu_busy", "client_cpu_share", "startup_s",
               "shutdown_s", "mode_total_s", "server_exit_code")


def build_report(args: argparse.Namespace, workload: Workload, per_mode: dict[str, Any],
                 idle_busy: float | None, total_s: float) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for mode in MODES:
        for key in REPORT_KEYS:
            report[f"{mode}_{key}"] = per_mode.get(f"{mode}_{key}")
    for suffix in ("ttft_p50_s", "tpot_p50_s", "throughput_tok_s"):
        report[f"disagg_over_coloc_{suffix}"] = ratio(report[f"disagg_{suffix}"],
                                                      report[f"coloc_{suffix}"])
    report["handoff_frac"] = report["disagg_handoff_frac"]
    report["handoff_frac_median"] = report["disagg_handoff_frac_median"]
    report["modes"] = args.modes
    report["workload"] = workload.description
    report["dtype"] = args.dtype
    report["threads_per_worker"] = args.threads
    report["kv_cache_gb"] = args.kv_cache_gb
    report["warmup_requests"] = args.warmup
    report["cpu_count"] = os.cpu_count()
    report["cpu_busy_before"] = idle_busy
    report["total_s"] = round(total_s, 1)
    return report


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def fmt(value: float | None, spec: str = ".2f", scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def print_table(report: dict[str, Any]) -> None:
    w = report["workload"]
    p_lo, p_mean, p_hi = w["prompt_tokens_min_mean_max"]
    o_lo, o_mean, o_hi = w["output_tokens_min_mean_max"]
    print(f"tandem serve under load: {w['source']} workload, {w['num_requests']} requests over "
          f"{w['arrival_span_s']:.0f} s ({fmt(w['offered_rate_req_s'], '.3f')} req/s), prompts "
          f"{p_lo}-{p_hi} (mean {p_mean:.0f}), outputs {o_lo}-{o_hi} (mean {o_mean:.0f}) tokens; "
          f"offered {fmt(w['offered_prompt_tok_s'], '.0f')} prompt + "
          f"{fmt(w['offered_output_tok_s'], '.0f')} output tok/s; dtype {report['dtype']}, "
          f"{report['threads_per_worker']} thread/worker")
    if w["source"] == "trace":
        how = "auto" if w["trace_scale_auto"] else "--trace-scale"
        print(f"trace {w['trace']}: first {w['num_requests']} rows ({w['trace_span_s']:.1f} s), "
              f"prompts clipped to {w['prompt_clip']} ({w['prompts_clipped']} clipped), outputs "
              f"to {w['output_clip']} ({w['outputs_clipped']} clipped); gaps stretched x"
              f"{w['trace_scale']:.2f} ({how}: trace {w['trace_prompt_tok_s']:.0f} -> target "
              f"{w['target_prompt_tok_s']:.0f} prompt tok/s)")
    header = (f"{'mode':<14} {'ok/sent':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'srvTTFT50':>9} "
              f"{'TPOT p50':>9} {'TPOT p99':>9} {'tok/s':>7} {'handoff/':>9} {'CPU':>5}")
    units = (f"{'':<14} {'':>7} {'s':>9} {'s':>9} {'s':>9} {'ms':>9} {'ms':>9} {'':>7} "
             f"{'prefill':>9} {'busy':>5}")
    print(header)
    print(units)
    print("-" * len(header))
    for mode in report["modes"]:
        r = {key: report[f"{mode}_{key}"] for key in REPORT_KEYS}
        handoff = fmt(r["handoff_frac"], ".3f") if mode == "disagg" else "-"
        sent = f"{r['ok']}/{r['requests']}"
        print(f"{MODE_LABELS[mode]:<14} {sent:>7} "
              f"{fmt(r['ttft_p50_s']):>9} {fmt(r['ttft_p99_s']):>9} "
              f"{fmt(r['server_ttft_p50_s']):>9} {fmt(r['tpot_p50_s'], '.1f', 1e3):>9} "
              f"{fmt(r['tpot_p99_s'], '.1f', 1e3):>9} {fmt(r['throughput_tok_s'], '.1f'):>7} "
              f"{handoff:>9} {fmt(r['cpu_busy'], '.0%'):>5}")
    for mode in report["modes"]:
        errors = report[f"{mode}_errors"]
        if errors:
            print(f"{mode}: {errors} failed requests: {report[f'{mode}_error_codes']}")
        if report[f"{mode}_wrong_length"]:
            print(f"{mode}: {report[f'{mode}_wrong_length']} requests generated a different "
                  f"number of tokens than asked")
    if "disagg" in report["modes"]:
        print(f"disagg handoff: sum(handoff_s)/sum(prefill_s) = "
              f"{fmt(report['handoff_frac'], '.3f')}, median per request "
              f"{fmt(report['handoff_frac_median'], '.3f')}, median handoff "
              f"{fmt(report['disagg_handoff_p50_s'], '.1f', 1e3)} ms")
    print("p99 of this few requests is close to the maximum. CPU caveat: both modes run 2 "
          "single-thread workers on the same "
          f"{report['cpu_count']} cores, competing with each other, the gateway, Ray's own "
          "processes and this client (CPU busy = whole machine during the load)")
    before = report["cpu_busy_before"]
    if before is not None and before > BUSY_WARNING:
        print(f"warning: the machine was {before:.0%} busy before the first server started; "
              "other processes competed for the CPU, numbers are unreliable")
