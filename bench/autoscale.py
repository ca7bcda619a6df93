"""The autoscaling policy at 1,000 GPUs, in the simulator, on both Azure traces.

Per trace: K (copies of each request, arrivals jittered within 1 s) is chosen so the cheapest
static provisioning needs about `--gpus` GPUs: the static search runs at `--probe-copies`,
and K scales its size to the target. At K it then runs, on the H200 Llama-3-8B profile with
SLO TTFT <= 2 s and mean ITL <= 50 ms:
- the cheapest static (prefill, decode) (grid around the scaled probe, then neighbours);
- the policy with its defaults, and with its scale-down window and step tuned by the simulator
  on the probe load (`tune_policy`; disaggregated; constant and ewma predictors);
- the oracle (per-minute provisioning from the known load, zero start-up);
- colocated replicas under the policy, and disaggregated with attention offload.
Autoscaled runs take over a cluster at the cheapest static provisioning (it was running before)
and scale it from there.
Prints the table, writes replicas-and-latency plots, and with --json one JSON line.

    python bench/autoscale.py [--traces conv code] [--gpus 1000] [--headroom 1.2]
        [--out bench-out] [--json]

(about 15 minutes a trace on one core). A last row reruns the policy with replicas that start
in 10 s instead of the profile's 60 s, to show what start-up time costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tandem.cluster.profile import ReplicaProfile
from tandem.sim.config import SimConfig
from tandem.sim.result import SimResult, plot
from tandem.sim.run import simulate
from tandem.sim.search import oracle, static_search, tune_policy
from tandem.sim.workload import Workload, from_trace

PROFILE = Path(__file__).resolve().parents[1] / "tandem/sim/profiles/llama-3-8b-h200.json"
TARGETS = {"conv": (0.8, 1.25), "code": (0.6, 1.25)}  # policy/static, policy/oracle


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def autoscaled(workload: Workload, profile: ReplicaProfile, config: SimConfig,
               start: tuple[int, int], **update) -> SimResult:
    """The policy, taking over a cluster at `start` replicas (the static provisioning)."""
    cfg = config.model_copy(update={"prefill": start[0], "decode": start[1], **update})
    if cfg.layout == "colocated":
        cfg = cfg.model_copy(update={"decode": sum(start)})
    return simulate(workload, profile, cfg, "cohort")


def run_trace(name: str, args, profile: ReplicaProfile) -> dict:
    base = SimConfig(slo={"ttft_s": 2.0, "itl_s": 0.05}, drain_s=600,
                     autoscale={"enabled": False, "headroom": args.headroom})
    probe_load = from_trace(name, args.probe_copies, seed=args.seed)
    probe, _ = static_search(probe_load, profile, base, report=log)
    # the policy's scale-down window and step, tuned by the simulator on the probe load
    tuned, _ = tune_policy(probe_load, profile, base, probe, report=log)
    auto = tuned.autoscale
    log(f"{name}: tuned scale_down_window_s {auto.scale_down_window_s:g}, "
        f"scale_down_step {auto.scale_down_step:g}")
    copies = max(1, round(args.probe_copies * args.gpus / sum(probe)))
    log(f"{name}: static at K={args.probe_copies} is P={probe[0]} D={probe[1]}; K={copies}")
    workload = from_trace(name, copies, seed=args.seed)
    start = (max(1, round(probe[0] * copies / args.probe_copies)),
             max(1, round(probe[1] * copies / args.probe_copies)))
    (p, d), static = static_search(workload, profile, base, start=start, grid=(0.95, 1.0, 1.05),
                                   report=log)
    rows: dict[str, SimResult] = {"static (cheapest)": static}
    defaults = base.autoscale.model_copy(update={"enabled": True})
    rows["policy, defaults"] = autoscaled(workload, profile, base, (p, d), autoscale=defaults)
    log(f"policy defaults: {rows['policy, defaults'].summary()}")
    rows["policy, constant"] = autoscaled(workload, profile, base, (p, d), autoscale=auto)
    log(f"policy constant: {rows['policy, constant'].summary()}")
    ewma = auto.model_copy(update={"predictor": "ewma"})
    rows["policy, ewma"] = autoscaled(workload, profile, base, (p, d), autoscale=ewma)
    rows["oracle"] = oracle(workload, profile, base, report=log)
    rows["policy, colocated"] = autoscaled(workload, profile, base, (p, d), autoscale=auto,
                                           layout="colocated")
    # attention replicas hold the KV the decode replicas cannot; the policy sizes that pool
    rows["policy, offload"] = autoscaled(workload, profile, base, (p, d), autoscale=auto,
                                         offload=True)
    quick = profile.model_copy(update={"startup_s": 10.0})
    rows["policy, 10 s start-up"] = autoscaled(workload, quick, base, (p, d), autoscale=auto)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(rows["policy, constant"], args.out / f"autoscale-{name}.png",
         f"{name} x{copies}: the policy (disaggregated)")
    return {"copies": copies, "requests": len(workload), "static": [p, d],
            "tuned": {"scale_down_window_s": auto.scale_down_window_s,
                      "scale_down_step": auto.scale_down_step},
            "rows": {k: v.summary() for k, v in rows.items()}}


def print_table(name: str, data: dict) -> list[str]:
    rows = data["rows"]
    static, best = rows["static (cheapest)"], rows["oracle"]
    tuned = data["tuned"]
    print(f"\n{name}: K={data['copies']} ({data['requests']:,} requests); cheapest static "
          f"P={data['static'][0]} D={data['static'][1]}; the policy tuned to scale-down window "
          f"{tuned['scale_down_window_s']:g} s, step {tuned['scale_down_step']:g}")
    print("| run | SLO attainment | GPU-hours | vs static | vs oracle | cost $ | TTFT p90 s | "
          "ITL p90 ms | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['attainment']:.4f} | {r['gpu_hours']:.1f} | "
              f"{r['gpu_hours'] / static['gpu_hours']:.2f}x | "
              f"{r['gpu_hours'] / best['gpu_hours']:.2f}x | {r['cost']:.0f} | "
              f"{r['ttft_p90_s']:.2f} | {r['itl_p90_s'] * 1e3:.1f} | {r['wall_s']:.1f} |")
    policy = rows["policy, constant"]
    share_static, share_oracle = TARGETS[name]
    checks = [("attainment >= 0.99", policy["attainment"] >= 0.99),
              (f"<= {share_static}x static",
               policy["gpu_hours"] <= share_static * static["gpu_hours"]),
              (f"<= {share_oracle}x oracle",
               policy["gpu_hours"] <= share_oracle * best["gpu_hours"]),
              ("one hour simulated in <= 120 s", policy["wall_s"] <= 120)]
    missed = [label for label, ok in checks if not ok]
    print("targets: " + "; ".join(f"{label}: {'met' if ok else 'MISS'}" for label, ok in checks))
    return missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", nargs="+", default=["conv", "code"])
    parser.add_argument("--gpus", type=int, default=1000)
    parser.add_argument("--probe-copies", type=int, default=50)
    parser.add_argument("--headroom", type=float, default=1.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    profile = ReplicaProfile.load(PROFILE)
    started = time.perf_counter()
    results, missed = {}, {}
    for name in args.traces:  # each table as soon as its trace is done
        results[name] = run_trace(name, args, profile)
        missed[name] = print_table(name, results[name])
        sys.stdout.flush()
    print(f"\n{time.perf_counter() - started:.0f} s in all; plots in {args.out}/")
    if args.json:
        print(json.dumps({"traces": results, "missed": missed}))


if __name__ == "__main__":
    main()
