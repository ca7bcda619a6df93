"""The planning commands: `tandem profile` (measure one replica here) and `tandem simulate`
(run a trace or synthetic load through the simulated cluster)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

SHIPPED_PROFILE = Path(__file__).parent / "profiles" / "llama-3-8b-h200.json"


def simulate_command(
    trace: Annotated[str | None, typer.Option(
        help="A shipped trace (conv, code) or a CSV path.")] = "conv",
    copies: Annotated[int, typer.Option(
        help="Each request this many times, arrivals jittered within 1 s.")] = 1,
    window: Annotated[tuple[float, float] | None, typer.Option(
        help="Only the requests arriving in [START, END) seconds.")] = None,
    rate: Annotated[float | None, typer.Option(
        help="Synthetic Poisson load (req/s) instead of a trace.")] = None,
    duration: Annotated[float, typer.Option(help="Synthetic load: seconds.")] = 600.0,
    prompt: Annotated[int, typer.Option(help="Synthetic load: prompt tokens.")] = 1024,
    output: Annotated[int, typer.Option(help="Synthetic load: output tokens.")] = 128,
    profile: Annotated[Path, typer.Option(
        help="Replica profile JSON (`tandem profile`).")] = SHIPPED_PROFILE,
    mode: Annotated[str, typer.Option(
        help="request (every request and step) or cohort (at scale).")] = "cohort",
    layout: Annotated[str, typer.Option(help="disaggregated or colocated.")] = "disaggregated",
    prefill: Annotated[int, typer.Option(help="Prefill replicas (the start).")] = 1,
    decode: Annotated[int, typer.Option(help="Decode replicas (the start).")] = 1,
    attention: Annotated[int, typer.Option(help="Attention replicas.")] = 0,
    offload: Annotated[bool, typer.Option(help="Attention offload.")] = False,
    transport: Annotated[str, typer.Option(help="KV handoff transport (a profile key).")] =
        "nixl",
    store_hit_rate: Annotated[float, typer.Option(
        help="Share of prompt tokens the KV store already holds.")] = 0.0,
    autoscale: Annotated[bool, typer.Option(help="Run the autoscaling policy.")] = False,
    predictor: Annotated[str, typer.Option(help="constant or ewma.")] = "constant",
    ttft: Annotated[float, typer.Option(help="SLO: TTFT, seconds.")] = 2.0,
    itl: Annotated[float, typer.Option(help="SLO: mean ITL, seconds.")] = 0.05,
    search: Annotated[bool, typer.Option(
        help="Find the cheapest static (prefill, decode) that meets the SLO.")] = False,
    tune: Annotated[bool, typer.Option(
        help="Find the policy's scale-down window and step that cost least while meeting the "
        "SLO, taking over at --prefill/--decode replicas.")] = False,
    oracle: Annotated[bool, typer.Option(
        help="Also run the oracle (per-minute provisioning, zero start-up).")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write replicas and latency as a PNG.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Simulate the cluster on a load: SLO attainment, GPU-hours, cost, pools over time."""
    from rich.console import Console

    from tandem.cluster.profile import ReplicaProfile
    from tandem.sim import search as searching
    from tandem.sim.config import SimConfig
    from tandem.sim.result import plot as write_plot
    from tandem.sim.run import simulate
    from tandem.sim.workload import from_trace, synthetic

    err = Console(stderr=True)
    try:
        replica = ReplicaProfile.load(profile)
        load = (synthetic(rate, duration, prompt, output) if rate is not None
                else from_trace(trace or "conv", copies))
        if window is not None:
            load = load.window(*window)
        config = SimConfig.model_validate({
            "layout": layout, "prefill": prefill, "decode": decode, "attention": attention,
            "offload": offload, "slo": {"ttft_s": ttft, "itl_s": itl},
            "transport": transport, "store_hit_rate": store_hit_rate,
            "autoscale": {"enabled": autoscale, "predictor": predictor}})
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from None
    err.print(f"{len(load):,} requests over {load.duration_s:,.0f} s; "
              f"{replica.model} on {replica.device}")
    results = {}
    if search:
        (p, d), results["static (cheapest)"] = searching.static_search(
            load, replica, config, report=err.print)
        err.print(f"cheapest static: prefill {p}, decode {d}")
    elif tune:
        tuned, results["policy (tuned)"] = searching.tune_policy(
            load, replica, config, (prefill, decode), report=err.print)
        err.print(f"tuned: scale_down_window_s {tuned.autoscale.scale_down_window_s:g}, "
                  f"scale_down_step {tuned.autoscale.scale_down_step:g}")
    else:
        results["run"] = simulate(load, replica, config, mode)  # type: ignore[arg-type]
    if oracle:
        results["oracle"] = searching.oracle(load, replica, config, report=err.print)
    if plot is not None:
        first = next(iter(results.values()))
        write_plot(first, plot, f"{trace if rate is None else 'synthetic'} x{copies}")
    if as_json:
        print(json.dumps({label: r.summary() for label, r in results.items()}))
        return
    for label, r in results.items():
        s = r.summary()
        print(f"{label}: attainment {s['attainment']:.4f}; TTFT p50/p90 {s['ttft_p50_s']:.3f}/"
              f"{s['ttft_p90_s']:.3f} s; ITL p50/p90 {s['itl_p50_s'] * 1e3:.1f}/"
              f"{s['itl_p90_s'] * 1e3:.1f} ms; {s['gpu_hours']:.2f} GPU-h; ${s['cost']:.2f}; "
              f"failed {s['failed']:.0f}; simulated in {s['wall_s']:.1f} s")


def profile_command(
    out: Annotated[Path, typer.Option(help="Where to write the profile JSON.")] = Path(
        "tandem-profile.json"),
    model: Annotated[str | None, typer.Option(help="GGUF or HF directory (default: the "
                                              "embedded SmolLM2-135M).")] = None,
    dtype: Annotated[str, typer.Option(help="Serving dtype.")] = "bfloat16",
    threads: Annotated[int, typer.Option(help="Torch threads (as one worker runs).")] = 1,
    prompt_lengths: Annotated[str, typer.Option(help="Prompt lengths, comma-separated.")] =
        "64,256,1024",
    batches: Annotated[str, typer.Option(help="Decode batches, comma-separated.")] = "1,4,16",
    contexts: Annotated[str, typer.Option(help="Decode contexts, comma-separated.")] =
        "128,1024",
) -> None:
    """Measure one replica on this machine and write a versioned profile for the autoscaler
    and the simulator (prefill tok/s, decode step times, handoff bandwidth, store loads)."""
    from rich.console import Console

    from tandem.cluster.profiling import measure_profile, write_profile
    from tandem.engine.config import EngineConfig

    err = Console(stderr=True)

    def ints(text: str, name: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise typer.BadParameter(f"{name}: {text!r} is not a list of integers") from None
        if not values or min(values) < 1:
            raise typer.BadParameter(f"{name}: give positive integers")
        return values

    config = EngineConfig(model=model, dtype=dtype, num_threads=threads)
    measured = measure_profile(config, ints(prompt_lengths, "--prompt-lengths"),
                               ints(batches, "--batches"), ints(contexts, "--contexts"),
                               report=lambda m: err.print(m))
    write_profile(measured, out)
    err.print(f"profile written to {out}")
