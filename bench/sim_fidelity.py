"""Does the simulator predict a real `tandem serve`? Profile, replay, simulate, compare.

1. `tandem profile` measures one replica on this machine (1 torch thread, as each worker runs).
2. A scaled Azure trace (`--trace`, its first `--num-requests` rows, arrivals stretched by
   `--trace-scale`, prompts clipped to [`--min-prompt`, `--max-prompt`] and outputs to
   `--max-output`) is replayed through a real `tandem serve` (1 prefill + 1 decode worker, one
   thread each) by `tandem bench`'s load runner over gRPC.
3. The simulator runs the same requests (arrival, prompt and output lengths) on 1 + 1 replicas
   with that profile, per request. The profile is measured before the replay and is not fitted
   to it.
Reported side by side: p50 and p90 of TTFT and TPOT, and the output throughput. Targets:
latencies within 25%, throughput within 10%.

    python bench/sim_fidelity.py [--trace conv] [--num-requests 40] [--trace-scale 20] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from serve_process import Server, log

from tandem.cluster.profile import ReplicaProfile
from tandem.loadgen.grpc_backend import GrpcBackend
from tandem.loadgen.runner import run_load, warm_up
from tandem.loadgen.trace import load_trace
from tandem.loadgen.workload import trace_workload
from tandem.sim.config import SimConfig
from tandem.sim.run import simulate
from tandem.sim.workload import Workload as SimWorkload

LATENCY_TOLERANCE, THROUGHPUT_TOLERANCE = 0.25, 0.10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default="conv")
    parser.add_argument("--num-requests", type=int, default=40)
    parser.add_argument("--trace-scale", type=float, default=20.0,
                        help="stretch of the trace's inter-arrival times")
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=1024)
    parser.add_argument("--max-output", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kv-cache-gb", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def measure_profile(args: argparse.Namespace, out: Path) -> ReplicaProfile:
    cmd = [sys.executable, "-m", "tandem.cli", "profile", "--out", str(out), "--dtype",
           args.dtype, "--threads", str(args.threads), "--prompt-lengths",
           f"32,128,512,{args.max_prompt}", "--batches", "1,2,4,8", "--contexts",
           f"128,{args.max_prompt}"]
    log("profiling one replica: " + " ".join(cmd[3:]))
    subprocess.run(cmd, check=True)
    return ReplicaProfile.load(out)


async def replay(address: str, workload) -> list:
    async with GrpcBackend(address, timeout=600) as backend:
        await warm_up(backend, 2)
        log(f"replaying {len(workload.requests)} requests over "
            f"{workload.requests[-1].arrival_s:.0f} s")
        return (await run_load(workload, backend)).results


def stats(ttft: np.ndarray, tpot: np.ndarray, tokens: float, span: float) -> dict[str, float]:
    return {"ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p90_s": float(np.percentile(ttft, 90)),
            "tpot_p50_s": float(np.percentile(tpot, 50)),
            "tpot_p90_s": float(np.percentile(tpot, 90)),
            "throughput_tok_s": tokens / span}


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        profile = measure_profile(args, Path(tmp) / "profile.json")
    rows = load_trace(args.trace)
    workload = trace_workload(rows, name=args.trace, rate_scale=1 / args.trace_scale,
                              num_requests=args.num_requests, min_prompt=args.min_prompt,
                              max_prompt=args.max_prompt, max_output=args.max_output,
                              seed=args.seed)
    server = Server("disagg", args)
    try:
        results = asyncio.run(replay(server.start(), workload))
    finally:
        server.stop()
    failed = [r for r in results if not r.ok]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed, e.g. {failed[0].error}")
    ok = [r for r in results if r.tpot_s is not None]
    span = max(r.end for r in results) - min(r.send for r in results)
    real = stats(np.array([r.ttft_s for r in ok]), np.array([r.tpot_s for r in ok]),
                 sum(r.completion_tokens for r in results), span)

    requests = workload.requests
    sim_load = SimWorkload(np.array([r.arrival_s for r in requests]),
                           np.array([len(r.prompt) for r in requests]),
                           np.array([r.max_tokens for r in requests]))
    transport = "nixl" if "nixl" in profile.handoff_bytes_per_s else "grpc"
    result = simulate(sim_load, profile, SimConfig(prefill=1, decode=1, transport=transport,
                                                   drain_s=3600), "request")
    # the simulator's ledger gives TTFT and mean ITL per request: the same percentiles
    sim = {"ttft_p50_s": result.ttft_p50, "ttft_p90_s": result.ttft_p90,
           "tpot_p50_s": result.itl_p50, "tpot_p90_s": result.itl_p90,
           "throughput_tok_s": result.output_tokens / (result.sim_seconds
                                                       - float(sim_load.arrival_s[0]))}
    print(f"\n{args.trace}: {len(requests)} requests, arrivals x{args.trace_scale:g}, prompts "
          f"{min(len(r.prompt) for r in requests)}-{max(len(r.prompt) for r in requests)}, "
          f"outputs {min(r.max_tokens for r in requests)}-{max(r.max_tokens for r in requests)}"
          f"; profile {profile.device}, handoff {transport}")
    print("| measure | tandem serve | simulator | sim / real | target |")
    print("|---|---|---|---|---|")
    verdicts = {}
    for key, label in (("ttft_p50_s", "TTFT p50 s"), ("ttft_p90_s", "TTFT p90 s"),
                       ("tpot_p50_s", "TPOT p50 s"), ("tpot_p90_s", "TPOT p90 s"),
                       ("throughput_tok_s", "throughput tok/s")):
        ratio = sim[key] / real[key] if real[key] else float("nan")
        tolerance = THROUGHPUT_TOLERANCE if key == "throughput_tok_s" else LATENCY_TOLERANCE
        verdicts[key] = bool(abs(ratio - 1) <= tolerance)
        print(f"| {label} | {real[key]:.4g} | {sim[key]:.4g} | {ratio:.2f} | "
              f"{'met' if verdicts[key] else 'MISS'} (±{tolerance:.0%}) |")
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    if args.json:
        print(json.dumps({"real": real, "sim": sim, "met": verdicts,
                          "profile": profile.model_dump(), "workload": workload.description}))


if __name__ == "__main__":
    main()
