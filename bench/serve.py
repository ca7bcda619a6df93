"""Disaggregated vs colocated serving under load: `tandem serve` driven by Poisson arrivals.

Two modes run on the same cores, one after the other (start the server, warm it up, run the
load, SIGINT it, wait for it to exit, then the other mode), with the same requests:

- disagg: `tandem serve --prefill-workers 1 --decode-workers 1`, one prefill and one decode
  worker; the prefill worker hands each request's KV to the decode worker.
- coloc: `tandem serve --colocated --prefill-workers 1 --decode-workers 1`, the baseline: two
  workers that each run both phases.

Each worker runs one torch thread (`--threads 1`), so both modes use two workers on two cores.
This script owns the servers, the CPU accounting and the comparison; the workload, the sending
(over gRPC) and the statistics are `tandem.loadgen`'s, the same code as `tandem bench`.

The workload (synthetic, the default): `--num-requests` requests whose arrivals are a Poisson
process of `--rate` requests/s (exponential gaps from a seeded RNG; the first request is sent at
t=0). Prompt lengths are uniform in [`--min-prompt`, `--max-prompt`] tokens and output lengths
uniform in [`--min-output`, `--max-output`]. Prompts are token ids drawn uniformly from
[1000, 40000), different for every request, so the prefix cache saves nothing. Requests use
`temperature=0` and `ignore_eos=True`, so each generates exactly its output length (one that
does not is counted in `{mode}_wrong_length`). Everything follows from `--seed`.

Default workload, sized to this 2-core CPU machine, where a one-thread worker prefills ~200-250
tok/s (1000-2000-token prompts, the other core busy) and decodes one sequence at ~10 tok/s
(TPOT ~90-105 ms; batching raises its throughput): 20 requests at 0.12 req/s, prompts 100-2000
tokens (mean 1050, ~125 prompt tok/s offered, 50-60% of one worker's prefill speed), outputs
16-128 tokens (mean 72, ~9 tok/s offered). The disaggregated server's single prefill worker is
then busy most of the time and Poisson bursts queue prefills for tens of seconds, but the backlog
drains between bursts instead of growing for the whole run (as it does at 0.25 req/s). The
seed-0 draw is a bit heavier than the nominal load (mean prompt ~1310 tokens, 0.128 req/s: ~167
prompt tok/s). One mode takes ~3 minutes, both about 6 minutes.

`--trace NAME|PATH` replays a real trace instead: `conv` or `code` (the Azure 2023 traces
shipped in tandem/loadgen/traces) or a CSV with TIMESTAMP,ContextTokens,GeneratedTokens. It
takes the first `--num-requests` rows and scales them to this machine:

- prompt length = ContextTokens clipped to [`--min-prompt`, `--max-prompt`] (the model's context
  is 8192 tokens but CPU prefill is slow); output length = GeneratedTokens clipped to
  [1, `--max-output`]; the token ids are random as above.
- arrival of row i = (TIMESTAMP_i - TIMESTAMP_0) * scale. `--trace-scale` sets the stretch
  factor (tandem.loadgen's rate_scale is its inverse); without it, scale = trace_tok_s /
  target_tok_s where trace_tok_s = (mean clipped prompt length) * (rows - 1) / (TIMESTAMP_last -
  TIMESTAMP_0) is the trace's offered prompt tokens/s and target_tok_s = `--rate` *
  (`--min-prompt` + `--max-prompt`) / 2 is what the synthetic workload offers, so the replay
  offers the same prompt tokens/s as the synthetic default.

Before the timed load each server gets `--warmup` concurrent short requests (64-token prompts, 4
output tokens) that are not measured.

Metrics, per mode, over the requests that succeeded (see tandem/loadgen/metrics.py):

- TTFT: client-observed, from sending the request to the first chunk carrying a token (includes
  queueing, prefill, the KV handoff in disagg, and gRPC); the gateway's own `ttft_s` is reported
  as `{mode}_server_ttft_*`.
- TPOT: per request with >= 2 tokens, (time of the chunk with the last token - time of the chunk
  with the first token) / (completion_tokens - 1), timed on the client.
- throughput: completion tokens of all successful requests / wall time from the first send to
  the last request's end.
- handoff_frac (disagg only): sum(handoff_s) / sum(prefill_s) from the server's timings, and
  `handoff_frac_median`, the median of the per-request ratios. prefill_s runs from the request's
  arrival on the prefill worker to its first token (so it includes queueing there); handoff_s is
  the KV export and transfer until the decode worker holds it.
- errors: failed requests are counted (by gRPC status in `{mode}_error_codes`), never fatal.

With ~20 samples p99 is essentially the maximum: read it as "worst case", not a stable tail.

CPU caveat: both modes put two single-thread workers on two cores, and the gateway, Ray's own
processes and this client compete with them for the same cores. The machine's CPU busy fraction
during each run is reported (`{mode}_cpu_busy`); keep the machine otherwise idle (a warning is
printed when it was busy before the first server started).

Run from the repository root:

    python bench/serve.py [--json]                         # both modes, ~6 minutes
    python bench/serve.py --trace conv --num-requests 16
    python bench/serve.py --modes disagg --num-requests 4 --rate 1   # quick smoke run

A table goes to stdout; progress and the servers' output go to stderr; with `--json` the last
stdout line is one JSON object: `{mode}_ttft_p50_s`, `{mode}_ttft_p99_s`, `{mode}_tpot_p50_s`,
`{mode}_tpot_p99_s`, `{mode}_throughput_tok_s`, `{mode}_errors`, ... for mode in disagg and coloc
(null for a mode not run), `handoff_frac`, `handoff_frac_median`, `workload` and `cpu_count`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from serve_process import (  # bench/, next to this script
    Server,
    busy_fraction,
    cpu_jiffies,
    log,
    measure_idle_busy,
)
from serve_report import BUSY_WARNING, MODES, build_report, print_table, summarize_mode

from tandem.loadgen import (
    GrpcBackend,
    LengthRange,
    Request,
    RequestResult,
    Workload,
    load_trace,
    run_load,
    synthetic_workload,
    trace_workload,
    warm_up,
)

REQUEST_TIMEOUT_S = 900.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Load `tandem serve` with Poisson arrivals: disaggregated vs colocated.")
    parser.add_argument("--num-requests", type=int, default=20, help="requests per mode")
    parser.add_argument("--rate", type=float, default=0.12,
                        help="Poisson arrival rate, requests/s (with --trace: sets the target "
                             "prompt tokens/s of the automatic --trace-scale)")
    parser.add_argument("--min-prompt", type=int, default=100, help="shortest prompt, tokens")
    parser.add_argument("--max-prompt", type=int, default=2000, help="longest prompt, tokens")
    parser.add_argument("--min-output", type=int, default=16, help="shortest output, tokens")
    parser.add_argument("--max-output", type=int, default=128, help="longest output, tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of arrivals, lengths and ids")
    parser.add_argument("--modes", default="disagg,coloc",
                        help="comma-separated modes to run, in order: disagg, coloc")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        default="bfloat16", help="serving dtype")
    parser.add_argument("--kv-cache-gb", type=float, default=None,
                        help="KV pool per worker, GiB (default: the server's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--warmup", type=int, default=2,
                        help="unmeasured concurrent short requests before the load")
    parser.add_argument("--trace", default=None,
                        help="replay a trace: conv, code (shipped Azure 2023 traces) or a CSV "
                             "path (TIMESTAMP,ContextTokens,GeneratedTokens)")
    parser.add_argument("--trace-scale", type=float, default=None,
                        help="stretch factor of the trace's inter-arrival times (default: "
                             "match the synthetic workload's prompt tokens/s)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as one JSON object on the last line")
    args = parser.parse_args(argv)
    for name in ("num_requests", "min_prompt", "min_output", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if not args.rate > 0:
        parser.error("--rate must be > 0")
    if args.min_prompt > args.max_prompt or args.min_output > args.max_output:
        parser.error("each --min-* must be <= its --max-*")
    if args.trace_scale is not None and not args.trace_scale > 0:
        parser.error("--trace-scale must be > 0")
    if args.kv_cache_gb is not None and not args.kv_cache_gb > 0:
        parser.error("--kv-cache-gb must be > 0")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes or len(set(args.modes)) != len(args.modes):
        parser.error(f"--modes must list distinct modes of {', '.join(MODES)}")
    return args


# -- workloads -------------------------------------------------------------------------------------


def synthetic(args: argparse.Namespace) -> Workload:
    return synthetic_workload(
        num_requests=args.num_requests, rate=args.rate, seed=args.seed,
        prompt_len=LengthRange(args.min_prompt, args.max_prompt),
        output_len=LengthRange(args.min_output, args.max_output))


def trace(args: argparse.Namespace) -> Workload:
    """The first --num-requests rows, stretched by --trace-scale or to the synthetic load."""
    try:
        all_rows = load_trace(args.trace)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    rows = all_rows[:args.num_requests]
    if len(rows) < 2:
        raise SystemExit(f"error: {args.trace}: a replay needs at least 2 rows, found {len(rows)}")
    if len(rows) < args.num_requests:
        log(f"warning: {args.trace} has only {len(rows)} rows; replaying those")
    span = rows[-1].arrival_s - rows[0].arrival_s
    if span <= 0:
        raise SystemExit(f"error: {args.trace}: the first {len(rows)} rows span no time")
    prompts = [min(max(r.prompt_tokens, args.min_prompt), args.max_prompt) for r in rows]
    trace_tok_s = sum(prompts) / len(prompts) * (len(rows) - 1) / span
    target_tok_s = args.rate * (args.min_prompt + args.max_prompt) / 2
    auto = args.trace_scale is None
    scale = trace_tok_s / target_tok_s if auto else args.trace_scale
    workload = trace_workload(
        all_rows, name=str(args.trace), rate_scale=1 / scale, num_requests=args.num_requests,
        min_prompt=args.min_prompt, max_prompt=args.max_prompt, max_output=args.max_output,
        seed=args.seed)
    workload.description.update(trace_prompt_tok_s=trace_tok_s, target_prompt_tok_s=target_tok_s,
                                trace_scale=scale, trace_scale_auto=auto)
    return workload


# -- the server process ----------------------------------------------------------------------------


# -- load ------------------------------------------------------------------------------------------


class LogProgress:
    """A `tandem.loadgen` progress hook that logs one line per finished request to stderr."""

    def __init__(self, mode: str, total: int) -> None:
        self.mode, self.total, self.done = mode, total, 0
        self.start = time.perf_counter()

    def request_started(self, index: int, request: Request) -> None:
        pass

    def request_finished(self, index: int, request: Request, result: RequestResult) -> None:
        self.done += 1
        if result.ok and result.ttft_s is not None:
            detail = (f"ttft {result.ttft_s:.2f} s, {result.completion_tokens} tokens in "
                      f"{result.e2e_s:.2f} s")
        else:
            detail = f"error {result.error_code}: {result.error}"
        log(f"  [{self.mode}] {self.done}/{self.total} request {index} (prompt "
            f"{len(request.prompt)}, output {request.max_tokens}) at "
            f"{result.end - self.start:.1f} s: {detail}")


async def load(mode: str, address: str, workload: Workload, warmup: int) -> list[RequestResult]:
    """Warm the server up, then send every request at its arrival time."""
    async with GrpcBackend(address, timeout=REQUEST_TIMEOUT_S) as backend:
        served = await backend.served_model()
        longest = max(len(r.prompt) + r.max_tokens for r in workload.requests)
        if served.max_model_len and longest > served.max_model_len:
            raise RuntimeError(f"a request needs {longest} tokens; the model holds "
                               f"{served.max_model_len}")
        if warmup:
            failed = [f"{r.error_code}: {r.error}" for r in await warm_up(backend, warmup)
                      if not r.ok]
            log(f"{mode}: warm-up failed: {failed}" if failed
                else f"{mode}: warm-up done ({warmup} requests)")
        log(f"{mode}: sending {len(workload.requests)} requests over "
            f"{workload.requests[-1].arrival_s:.0f} s")
        run = await run_load(workload, backend, progress=LogProgress(mode, len(workload.requests)))
    return run.results


# -- metrics ---------------------------------------------------------------------------------------


def run_mode(mode: str, args: argparse.Namespace, workload: Workload) -> dict[str, Any]:
    server = Server(mode, args)
    wall: dict[str, float] = {}
    began = time.monotonic()
    try:
        address = server.start()
        wall["startup"] = time.monotonic() - began
        cpu_before, client_before, load_began = cpu_jiffies(), time.process_time(), \
            time.monotonic()
        results = asyncio.run(load(mode, address, workload, args.warmup))
        load_wall = time.monotonic() - load_began
        cpu_busy = busy_fraction(cpu_before, cpu_jiffies())
        client_cpu = (time.process_time() - client_before) / load_wall
    finally:
        stopping = time.monotonic()
        exit_code = server.stop()
        wall["shutdown"] = time.monotonic() - stopping
    wall["mode_total"] = time.monotonic() - began
    report = summarize_mode(mode, results, wall, cpu_busy, client_cpu)
    report[f"{mode}_server_exit_code"] = exit_code
    return report


# -- report ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.monotonic()
    workload = trace(args) if args.trace else synthetic(args)
    log(f"workload: {json.dumps(workload.description)}")
    idle_busy = measure_idle_busy()
    if idle_busy is not None and idle_busy > BUSY_WARNING:
        log(f"warning: the machine is {idle_busy:.0%} busy before the benchmark starts")
    per_mode: dict[str, Any] = {}
    for mode in args.modes:
        per_mode.update(run_mode(mode, args, workload))
    report = build_report(args, workload, per_mode, idle_busy, time.monotonic() - began)
    print_table(report)
    if args.json:
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
