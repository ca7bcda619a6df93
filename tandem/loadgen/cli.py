"""`tandem bench`: load a running Tandem gateway over gRPC or HTTP and report its latencies.

A plain typer-annotated function, registered by the main CLI with `app.command("bench")(bench)`.
The flow: build the workload (synthetic or a trace), ask the server for its model, check every
request fits the model's context, warm up, run the load with a progress bar on stderr, then print
the tables on stdout (and with --json one JSON object as the last stdout line).

Exit codes: 0 after a run (failed requests are reported, not fatal) unless no request
succeeded (1); 2 for bad options; 1 when the server cannot be reached or the workload does not
fit its model.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any, cast

import typer

from tandem.loadgen.backend import Backend
from tandem.loadgen.metrics import Slo, Summary, summarize
from tandem.loadgen.progress import RichProgress
from tandem.loadgen.report import build_report, json_line, print_tables
from tandem.loadgen.runner import run_load, warm_up
from tandem.loadgen.trace import TRACE_NAMES, load_trace
from tandem.loadgen.workload import (
    ARRIVALS,
    Arrival,
    LengthRange,
    Workload,
    synthetic_workload,
    trace_workload,
)

DEFAULT_NUM_REQUESTS = 20  # synthetic, when neither --num-requests nor --duration is given


def bench(
    address: Annotated[str, typer.Option(
        help="Gateway gRPC address, host:port.")] = "127.0.0.1:50051",
    http_url: Annotated[str | None, typer.Option(
        help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000; selects --backend http."
    )] = None,
    backend: Annotated[str | None, typer.Option(
        help="grpc | http (default: http when --http-url is given, else grpc).")] = None,
    api_key: Annotated[str | None, typer.Option(
        envvar="TANDEM_API_KEY", help="Bearer API key (env TANDEM_API_KEY).")] = None,
    tls: Annotated[bool, typer.Option(help="gRPC over TLS (https URLs always are).")] = False,
    tls_ca: Annotated[Path | None, typer.Option(
        help="PEM CA bundle that signed the server's certificate.")] = None,
    model: Annotated[str | None, typer.Option(
        help="Model to request (default: the server's first).")] = None,
    dataset: Annotated[str, typer.Option(
        help="synthetic | conv | code (Azure 2023 traces, shipped) | PATH to a trace CSV."
    )] = "synthetic",
    num_requests: Annotated[int | None, typer.Option(
        help=f"Requests to send (synthetic default {DEFAULT_NUM_REQUESTS}; a trace: the first "
             "N rows, default all).")] = None,
    rate: Annotated[float, typer.Option(
        help="Synthetic arrival rate, requests/s; inf sends all at once.")] = 1.0,
    arrival: Annotated[str, typer.Option(
        help="Synthetic arrivals: poisson (exponential gaps) | constant.")] = "poisson",
    prompt_len: Annotated[str, typer.Option(
        help="Synthetic prompt tokens: N, or LOW-HIGH for uniform.")] = "100-1000",
    output_len: Annotated[str, typer.Option(
        help="Synthetic output tokens: N, or LOW-HIGH for uniform.")] = "16-128",
    rate_scale: Annotated[float, typer.Option(
        help="Trace replay speed: 0.02 = 2% of the trace's request rate (gaps x50).")] = 1.0,
    duration: Annotated[float | None, typer.Option(
        help="Only requests arriving in the first S seconds (after --rate-scale).")] = None,
    max_prompt: Annotated[int | None, typer.Option(
        help="Cap prompt lengths (trace rows clipped, synthetic range capped).")] = None,
    max_output: Annotated[int | None, typer.Option(
        help="Cap output lengths (trace rows clipped, synthetic range capped).")] = None,
    max_concurrency: Annotated[int | None, typer.Option(
        help="Most requests in flight; later arrivals wait on the client.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of arrivals, lengths and token ids.")] = 0,
    warmup: Annotated[int, typer.Option(
        help="Unmeasured concurrent short requests before the load.")] = 0,
    slo_ttft: Annotated[float | None, typer.Option(help="Goodput SLO on TTFT, s.")] = None,
    slo_tpot: Annotated[float | None, typer.Option(help="Goodput SLO on TPOT, s.")] = None,
    timeout: Annotated[float, typer.Option(help="Per-request deadline, s.")] = 600.0,
    progress: Annotated[bool, typer.Option(help="Progress bar on stderr.")] = True,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Also print one JSON object as the last stdout line.")] = False,
) -> None:
    """Benchmark a running gateway: TTFT, TPOT, latency percentiles, throughput, goodput."""
    kind = backend or ("http" if http_url else "grpc")
    try:
        if kind not in ("grpc", "http"):
            raise ValueError(f"--backend must be grpc or http, not {kind!r}")
        for name, value in (("--timeout", timeout), ("--slo-ttft", slo_ttft),
                            ("--slo-tpot", slo_tpot)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0")
        if warmup < 0:
            raise ValueError("--warmup must be >= 0")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError("--max-concurrency must be >= 1")
        workload = make_workload(
            dataset, num_requests=num_requests, rate=rate, arrival=arrival,
            prompt_len=prompt_len, output_len=output_len, rate_scale=rate_scale,
            duration=duration, max_prompt=max_prompt, max_output=max_output, seed=seed)
        target = (http_url or "http://127.0.0.1:8000") if kind == "http" else address
        # built inside the event loop (by _run): a gRPC channel belongs to the loop it starts in
        connect: Callable[[], Backend]
        if kind == "http":
            from tandem.loadgen.http_backend import HttpBackend

            verify = ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else True
            connect = partial(HttpBackend, target, api_key=api_key, timeout=timeout,
                              model=model, verify=verify)
        else:
            from tandem.loadgen.grpc_backend import GrpcBackend

            connect = partial(GrpcBackend, target, api_key=api_key, tls=tls or tls_ca is not None,
                              root_certificates=tls_ca.read_bytes() if tls_ca else None,
                              timeout=timeout, model=model)
    except (ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        report, summary = asyncio.run(_run(
            connect, workload, max_concurrency=max_concurrency, warmup=warmup,
            slo=Slo(slo_ttft, slo_tpot), progress=progress,
            context={"backend": kind, "target": target}))
    except Exception as e:  # unreachable server, a model that cannot hold the workload
        typer.echo(f"error: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(1) from None
    print_tables(report, summary)
    if json_output:
        print(json_line(report), flush=True)
    if summary.completed == 0:
        raise typer.Exit(1)


def make_workload(dataset: str, *, num_requests: int | None, rate: float, arrival: str,
                  prompt_len: str, output_len: str, rate_scale: float, duration: float | None,
                  max_prompt: int | None, max_output: int | None, seed: int) -> Workload:
    """The workload the options describe; ValueError for bad ones."""
    if dataset == "synthetic":
        if arrival not in ARRIVALS:
            raise ValueError(f"--arrival must be one of {', '.join(ARRIVALS)}")
        if num_requests is None and duration is None:
            num_requests = DEFAULT_NUM_REQUESTS
        return synthetic_workload(
            num_requests=num_requests, rate=rate, arrival=cast(Arrival, arrival),
            prompt_len=_capped(LengthRange.parse(prompt_len), max_prompt),
            output_len=_capped(LengthRange.parse(output_len), max_output),
            duration_s=duration, seed=seed)
    if dataset not in TRACE_NAMES and not Path(dataset).is_file():
        raise ValueError(f"--dataset {dataset!r}: not synthetic, {', '.join(TRACE_NAMES)} "
                         "or a trace file")
    for name, value in (("--max-prompt", max_prompt), ("--max-output", max_output)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1")
    return trace_workload(load_trace(dataset), name=dataset, rate_scale=rate_scale,
                          duration_s=duration, num_requests=num_requests,
                          max_prompt=max_prompt, max_output=max_output, seed=seed)


def _capped(lengths: LengthRange, cap: int | None) -> LengthRange:
    if cap is None:
        return lengths
    if cap < 1:
        raise ValueError("--max-prompt and --max-output must be >= 1")
    return LengthRange(min(lengths.low, cap), min(lengths.high, cap))


async def _run(connect: Callable[[], Backend], workload: Workload, *,
               max_concurrency: int | None, warmup: int, slo: Slo, progress: bool,
               context: dict[str, Any]) -> tuple[dict[str, Any], Summary]:
    client = connect()
    try:
        served = await client.served_model()
        longest = max(len(r.prompt) + r.max_tokens for r in workload.requests)
        if served.max_model_len is not None and longest > served.max_model_len:
            raise RuntimeError(
                f"a request needs {longest} tokens but {served.id} holds {served.max_model_len}; "
                "lower --max-prompt / --max-output")
        if warmup:
            failed = [r.error_code for r in await warm_up(client, warmup) if not r.ok]
            if failed:
                typer.echo(f"warning: {len(failed)} of {warmup} warm-up requests failed: "
                           f"{sorted(set(failed))}", err=True)
        if progress:
            with RichProgress(len(workload.requests), description=f"bench {served.id}") as bar:
                run = await run_load(workload, client, max_concurrency=max_concurrency,
                                     progress=bar)
        else:
            run = await run_load(workload, client, max_concurrency=max_concurrency)
    finally:
        await client.aclose()
    summary = summarize(run.results, slo)
    context = {**context, "model": served.id, "max_concurrency": max_concurrency,
               "warmup": warmup}
    return build_report(summary, workload.description, **context), summary
