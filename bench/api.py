"""The OpenAI HTTP API against the gRPC API on one `tandem serve`: does HTTP streaming add to TPOT?

One server (`tandem serve --prefill-workers 1 --decode-workers 1 --http-port 0`, the defaults
of `make run`: bfloat16, one torch thread per worker) is started once; `tandem bench` then
drives it over gRPC and over HTTP (streamed /v1/completions), alternating backends run by run
so that drift in the machine's speed hits both alike:

- streams: `--rounds` (3) rounds of {gRPC, HTTP} (the first backend alternates by round), each
  `--streams` (16) concurrent streams of `--stream-prompt` (64) token prompts and
  `--stream-output` (64) output tokens (`--rate inf --max-concurrency 16`, 32 requests, so 16
  are in flight throughout); after one unmeasured warm-up run per backend.
- trace: the Azure 2023 conversation trace shipped with Tandem, replayed once per backend: the
  first `--trace-requests` (24) rows at `--trace-rate-scale` (0.1: a tenth of the trace's request
  rate, ~0.16 req/s: what one CPU prefill worker keeps up with), prompts clipped to
  `--trace-max-prompt` (512) tokens and outputs to `--trace-max-output` (64), so a 2-core
  machine serves it in about 3 minutes per backend.

Reported per backend: the median over rounds of each run's TPOT p50 and mean, TTFT p50 and
output tok/s, and the ratio HTTP / gRPC (target: TPOT ratio <= 1.05). Every figure is
client-side, measured by `tandem bench` (TPOT = (last token - first token) / (tokens - 1)).

    python bench/api.py [--json]          # ~10 minutes on 2 cores
    python bench/api.py --rounds 1 --trace-requests 0 --streams 4   # a quick smoke run

The table goes to stdout, progress and the server's output to stderr, and with `--json` the
last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_process import Server, log  # bench/, next to this script

TPOT_TARGET = 1.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--stream-prompt", type=int, default=64)
    p.add_argument("--stream-output", type=int, default=64)
    p.add_argument("--trace-requests", type=int, default=24, help="0 skips the trace replay")
    p.add_argument("--trace-rate-scale", type=float, default=0.1)
    p.add_argument("--trace-max-prompt", type=int, default=512)
    p.add_argument("--trace-max-output", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kv-cache-gb", type=float, default=None)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def bench(target: list[str], flags: list[str]) -> dict[str, Any]:
    """One `tandem bench` run; its JSON report."""
    cmd = [sys.executable, "-m", "tandem.cli", "bench", *target, *flags, "--json",
           "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({done.returncode}):\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    server = Server("disagg", args)
    server.start()
    targets = {"grpc": ["--address", server.address],
               "http": ["--http-url", f"http://{server.http_address}"]}
    n = args.streams
    streams = ["--num-requests", str(2 * n), "--rate", "inf", "--max-concurrency", str(n),
               "--prompt-len", str(args.stream_prompt), "--output-len", str(args.stream_output)]
    runs: dict[str, list[dict[str, Any]]] = {"grpc": [], "http": []}
    trace: dict[str, dict[str, Any]] = {}
    try:
        for target in targets.values():  # warm-up: not measured
            bench(target, ["--num-requests", "4", "--rate", "inf", "--prompt-len", "32",
                           "--output-len", "4"])
        for r in range(args.rounds):
            order = ["grpc", "http"] if r % 2 == 0 else ["http", "grpc"]
            for backend in order:
                started = time.perf_counter()
                report = bench(targets[backend], streams)
                runs[backend].append(report)
                log(f"round {r + 1} {backend}: TPOT p50 {report['tpot_p50_s'] * 1000:.1f} ms, "
                    f"{report['output_throughput_tok_s']:.1f} tok/s "
                    f"({time.perf_counter() - started:.0f} s)")
        if args.trace_requests:
            replay = ["--dataset", "conv", "--num-requests", str(args.trace_requests),
                      "--rate-scale", str(args.trace_rate_scale),
                      "--max-prompt", str(args.trace_max_prompt),
                      "--max-output", str(args.trace_max_output)]
            for backend in ("grpc", "http"):
                trace[backend] = bench(targets[backend], replay)
                log(f"trace {backend}: TPOT p50 {trace[backend]['tpot_p50_s'] * 1000:.1f} ms")
    finally:
        server.stop()
    return {"streams": summarize(runs), "trace": trace_summary(trace), "runs": runs,
            "settings": vars(args)}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    keys = ("tpot_p50_s", "tpot_mean_s", "ttft_p50_s", "output_throughput_tok_s", "failed")
    for backend, reports in runs.items():
        out[backend] = {k: statistics.median(r[k] for r in reports) for k in keys}
        out[backend]["tpot_p50_per_round_s"] = [r["tpot_p50_s"] for r in reports]
    if runs["grpc"] and runs["http"]:
        out["tpot_p50_ratio"] = out["http"]["tpot_p50_s"] / out["grpc"]["tpot_p50_s"]
        out["tpot_mean_ratio"] = out["http"]["tpot_mean_s"] / out["grpc"]["tpot_mean_s"]
        out["target_met"] = out["tpot_p50_ratio"] <= TPOT_TARGET
    return out


def trace_summary(trace: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {b: {k: r[k] for k in ("completed", "failed", "tpot_p50_s", "tpot_p99_s",
                                 "ttft_p50_s", "ttft_p99_s", "output_throughput_tok_s")}
           for b, r in trace.items()}
    if len(trace) == 2:
        out["tpot_p50_ratio"] = trace["http"]["tpot_p50_s"] / trace["grpc"]["tpot_p50_s"]
        out["workload"] = trace["grpc"]["workload"]
    return out


def print_table(report: dict[str, Any]) -> None:
    s = report["streams"]
    print(f"{'16 concurrent streams' if report['settings']['streams'] == 16 else 'streams':24}"
          f"{'gRPC':>12}{'HTTP':>12}{'HTTP/gRPC':>12}")
    for key, label, scale in (("tpot_p50_s", "TPOT p50 (ms)", 1000),
                              ("tpot_mean_s", "TPOT mean (ms)", 1000),
                              ("ttft_p50_s", "TTFT p50 (ms)", 1000),
                              ("output_throughput_tok_s", "output tok/s", 1)):
        g, h = s["grpc"][key], s["http"][key]
        print(f"{label:24}{g * scale:12.1f}{h * scale:12.1f}{h / g:12.3f}")
    print(f"target: HTTP TPOT p50 <= {TPOT_TARGET:.2f}x gRPC: "
          f"{'met' if s.get('target_met') else 'MISS'} ({s['tpot_p50_ratio']:.3f})")
    t = report["trace"]
    if "grpc" in t:
        print(f"\n{'conv trace replay':24}{'gRPC':>12}{'HTTP':>12}")
        for key, label, scale in (("tpot_p50_s", "TPOT p50 (ms)", 1000),
                                  ("tpot_p99_s", "TPOT p99 (ms)", 1000),
                                  ("ttft_p50_s", "TTFT p50 (ms)", 1000),
                                  ("ttft_p99_s", "TTFT p99 (ms)", 1000),
                                  ("output_throughput_tok_s", "output tok/s", 1),
                                  ("completed", "completed", 1)):
            print(f"{label:24}{t['grpc'][key] * scale:12.1f}{t['http'][key] * scale:12.1f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
