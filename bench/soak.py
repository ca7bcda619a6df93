"""Soak: 64 concurrent streaming clients for 10 minutes against `tandem serve` on this machine.

One server (`tandem serve` with `make run`'s defaults: 1 prefill + 1 decode worker, bf16, one
torch thread each) runs a closed loop of `--clients` (64) gRPC clients through `tandem bench`'s
load code (`tandem.loadgen.soak.closed_loop`): each sends a request (prompt `--prompt-len`
16-64 random token ids, output `--output-len` 4-16 tokens, greedy, EOS ignored) as soon as its
previous one ends, for `--duration` (600) seconds. Every `--sample-s` (5) seconds the Admin
service's Status is read: each worker's RSS, KV use, and open requests.

Reported: requests, errors (by code), output tok/s, TTFT/TPOT/E2E p50 and p99; each worker's
RSS after the warm-up (`--warmup-s`, 60) and at the end, and its growth (target < 5%); and,
after the load, whether every KV block is free and no request or transfer session is open
(targets: 0 errors, 0 blocks held, 0 open sessions). RSS over time goes to `--out`/soak_rss.png.

    python bench/soak.py [--json] [--out DIR]            # ~11 minutes
    python bench/soak.py --duration 60 --warmup-s 20     # a short run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contextlib

from serve_process import Server, log  # bench/, next to this script

from tandem.client import AsyncClient
from tandem.loadgen import GrpcBackend, LengthRange, summarize
from tandem.loadgen.soak import closed_loop

RSS_GROWTH_TARGET = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--warmup-s", type=float, default=60.0)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--prompt-len", type=LengthRange.parse, default=LengthRange(16, 64))
    p.add_argument("--output-len", type=LengthRange.parse, default=LengthRange(4, 16))
    p.add_argument("--out", default=".", help="where soak_rss.png goes")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kv-cache-gb", type=float, default=None)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


async def soak(args: argparse.Namespace, address: str) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    done = asyncio.Event()
    completed = 0

    def counted(_) -> None:
        nonlocal completed
        completed += 1

    async def sample(client: AsyncClient, started: float) -> None:
        while not done.is_set():
            status = await client.status()
            samples.append({"t": time.monotonic() - started, "workers": {
                w.id: {"rss": w.rss_bytes, "kv": w.kv_cache_usage, "open": w.open_requests,
                       "running": w.num_running} for w in status.workers}})
            log(f"[{samples[-1]['t']:5.0f} s] {completed} requests done; RSS " + ", ".join(
                f"{w.id} {w.rss_bytes / 2**20:.0f} MiB" for w in status.workers))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), args.sample_s)

    async with GrpcBackend(address, timeout=600) as backend, \
            AsyncClient(address, timeout=30) as admin:
        await backend.served_model()
        started = time.monotonic()
        sampler = asyncio.create_task(sample(admin, started))
        results = await closed_loop(backend, args.clients, args.duration, args.prompt_len,
                                    args.output_len, on_result=counted)
        wall = time.monotonic() - started
        done.set()
        await sampler
        await asyncio.sleep(8)  # the monitor refreshes every 2 s: let the end state show
        end = await admin.status()
    summary = summarize(results)
    return {"summary": summary, "samples": samples, "wall_s": wall,
            "end": {w.id: {"kv_cache_usage": w.kv_cache_usage, "open_requests": w.open_requests,
                           "running": w.num_running, "waiting": w.num_waiting}
                    for w in end.workers}}


def rss_report(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    after = [s for s in samples if s["t"] >= warmup_s] or samples
    first, last = after[0], samples[-1]
    out = {}
    for worker in last["workers"]:
        start, end = first["workers"][worker]["rss"], last["workers"][worker]["rss"]
        out[worker] = {"rss_after_warmup_mib": start / 2**20, "rss_end_mib": end / 2**20,
                       "growth": (end - start) / start if start else None}
    return out


def plot(samples: list[dict[str, Any]], warmup_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for worker in samples[-1]["workers"]:
        ax.plot([s["t"] for s in samples],
                [s["workers"][worker]["rss"] / 2**20 for s in samples], label=worker)
    ax.axvline(warmup_s, color="grey", linestyle="--", label="end of warm-up")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("Worker RSS during the soak")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    server = Server("disagg", args)
    server.start()
    try:
        result = asyncio.run(soak(args, server.address))
    finally:
        server.stop()
    s = result["summary"]
    rss = rss_report(result["samples"], args.warmup_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(result["samples"], args.warmup_s, out / "soak_rss.png")
    held = {w: e for w, e in result["end"].items()
            if e["kv_cache_usage"] > 0 or e["open_requests"] or e["running"] or e["waiting"]}
    growth = max((r["growth"] or 0.0) for r in rss.values())
    report = {"clients": args.clients, "duration_s": args.duration, "requests": s.requests,
              "completed": s.completed, "errors": s.failed, "error_codes": s.error_codes,
              "output_tok_s": s.output_throughput, "request_s": s.request_throughput,
              "ttft_p50_s": s.ttft.p50, "ttft_p99_s": s.ttft.p99, "tpot_p50_s": s.tpot.p50,
              "tpot_p99_s": s.tpot.p99, "e2e_p50_s": s.e2e.p50, "e2e_p99_s": s.e2e.p99,
              "rss": rss, "max_rss_growth": growth, "held_at_end": held,
              "end": result["end"], "plot": str(out / "soak_rss.png")}
    print(f"{s.completed} requests from {args.clients} clients in {args.duration:.0f} s: "
          f"{s.failed} errors {dict(s.error_codes)}, {s.output_throughput:.1f} output tok/s")
    print(f"TTFT p50/p99 {s.ttft.p50:.3f}/{s.ttft.p99:.3f} s, TPOT p50/p99 "
          f"{s.tpot.p50 * 1000:.1f}/{s.tpot.p99 * 1000:.1f} ms, E2E p50/p99 "
          f"{s.e2e.p50:.2f}/{s.e2e.p99:.2f} s")
    for worker, r in rss.items():
        print(f"{worker}: RSS {r['rss_after_warmup_mib']:.0f} MiB after warm-up -> "
              f"{r['rss_end_mib']:.0f} MiB at the end ({(r['growth'] or 0) * 100:+.2f}%)")
    print(f"targets: 0 errors {'met' if not s.failed else 'MISS'}; RSS growth < 5% "
          f"{'met' if growth < RSS_GROWTH_TARGET else 'MISS'} ({growth * 100:+.2f}%); "
          f"nothing held at the end {'met' if not held else 'MISS'}; plot: {report['plot']}")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
