"""What a stream sees when its decode worker drains, and when it is lost, at batch 1.

For each KV transport (`--transports`: nixl, grpc), one `tandem serve --prefill-workers 1
--decode-workers 3 --kv-transport T` (bf16, one torch thread per worker) serves one greedy
stream at a time of a `--context` (2,048) token prompt (random token ids) and `--tokens` (256)
output tokens, EOS ignored:

- drain: after `--after` (16) tokens, `Admin.Drain` the decode worker that runs it: the request
  moves with its KV (live migration over the transport) to another decode worker. The stall is
  the stream's longest gap between two tokens, against its median gap (target: stall <= 3x the
  median inter-token time);
- loss: after `--after` tokens, the decode worker that runs it is killed (SIGKILL): the request
  resumes by re-prefill (its prompt and the tokens so far are prefilled again); the time to
  resume is the stream's longest gap. This is also the baseline a KV move is measured against.

Each server is started once per transport and both events run on it (drain first, then the
loss, each leaving a decode worker to move to). Times are client-side. How each event moved the
request is read from the gateway's `/metrics` (tandem:request_migrated, tandem:request_resumed);
a run whose drain or kill did not happen, or did not move the request the expected way, fails
rather than report.

    python bench/migration.py [--json] [--transports nixl grpc] [--context 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from serve_process import Server, log  # bench/, next to this script

from tandem.client import Client

STALL_TARGET = 3.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--transports", nargs="+", default=["nixl", "grpc"])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--after", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kv-cache-gb", type=float, default=None)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def holder_of(client: Client, wait_s: float = 10.0) -> Any:
    """The decode worker running the one live request (Status refreshes every 2 s)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        status = client.status()
        running = [w for w in status.workers if w.role == "decode" and w.num_running > 0]
        if running:
            return running[0]
        time.sleep(0.2)
    raise RuntimeError("no decode worker reported the request as running")


def moves(http_address: str) -> dict[str, float]:
    """The gateway's migrated and resumed request counters."""
    with urllib.request.urlopen(f"http://{http_address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = {}
    for name in ("migrated", "resumed"):
        match = re.search(rf"^tandem:request_{name}_total\{{[^}}]*\}} (\S+)$", text, re.M)
        if match is None:
            raise RuntimeError(f"/metrics has no tandem:request_{name}_total")
        found[name] = float(match.group(1))
    return found


def stream_with(address: str, prompt: list[int], tokens: int, after: int, event) -> dict:
    """Stream one request; call `event(client)` once `after` tokens arrived; the gaps, and
    what the event returned (it must have happened, or the figures mean nothing)."""
    stamps: list[float] = []
    fired = None
    outcome: dict[str, Any] = {}

    def run_event(client: Client) -> None:
        try:
            outcome["result"] = event(client)
        except Exception as e:  # reported: a run without its event is not a measurement
            outcome["error"] = repr(e)

    with Client(address, timeout=600) as client:
        for chunk in client.stream(prompt, max_tokens=tokens, temperature=0, ignore_eos=True):
            now = time.perf_counter()
            stamps.extend([now] * len(chunk.token_ids))
            if len(stamps) >= after and fired is None:
                fired = threading.Thread(target=run_event, args=(client,))
                fired.start()
            if chunk.finish_reason:
                break
    if fired is not None:
        fired.join(600)
    if "error" in outcome or fired is None:
        raise RuntimeError(f"the event did not happen: {outcome.get('error', 'too short')}")
    gaps = [b - a for a, b in itertools.pairwise(stamps) if b > a]
    return {"tokens": len(stamps), "stall_s": max(gaps), "median_gap_s": statistics.median(gaps),
            "event": outcome.get("result")}


def run_transport(transport: str, args: argparse.Namespace) -> dict[str, Any]:
    server = Server("disagg", args, decode_workers=3, extra=("--kv-transport", transport))
    server.start()
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 40000) for _ in range(args.context)] for _ in range(3)]
    try:
        with Client(server.address, timeout=600) as c:  # warm-up: one unmeasured stream
            c.generate(prompts[0], max_tokens=4, temperature=0, ignore_eos=True)

        def drain(client: Client) -> str:
            reply = client.drain(holder_of(client).id)
            if reply.moved_requests != 1:
                raise RuntimeError(f"the drain moved {reply.moved_requests} requests, not 1")
            return f"drained {reply.worker_id}"

        def kill(client: Client) -> str:
            worker = holder_of(client)
            os.kill(worker.pid, signal.SIGKILL)  # Status names its process
            return f"killed {worker.id} (pid {worker.pid})"

        assert server.http_address is not None
        before = moves(server.http_address)
        drained = stream_with(server.address, prompts[1], args.tokens, args.after, drain)
        after_drain = moves(server.http_address)
        if after_drain["migrated"] != before["migrated"] + 1:
            raise RuntimeError(f"the drain did not move the request by KV: {after_drain}")
        log(f"{transport} drain: {drained}")
        lost = stream_with(server.address, prompts[2], args.tokens, args.after, kill)
        if moves(server.http_address)["resumed"] != after_drain["resumed"] + 1:
            raise RuntimeError("the loss did not resume the request")
        log(f"{transport} loss: {lost}")
    finally:
        server.stop()
    return {"drain": drained, "loss": lost,
            "drain_stall_ratio": drained["stall_s"] / drained["median_gap_s"],
            "loss_stall_ratio": lost["stall_s"] / lost["median_gap_s"]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = {t: run_transport(t, args) for t in args.transports}
    print(f"{'transport':10}{'median ITL':>12}{'KV move stall':>15}{'ratio':>8}"
          f"{'re-prefill after loss':>23}{'ratio':>8}")
    for t, r in report.items():
        d, lost = r["drain"], r["loss"]
        print(f"{t:10}{d['median_gap_s'] * 1000:10.1f}ms{d['stall_s'] * 1000:13.0f}ms"
              f"{r['drain_stall_ratio']:8.1f}{lost['stall_s'] * 1000:21.0f}ms"
              f"{r['loss_stall_ratio']:8.1f}")
    worst = max(r["drain_stall_ratio"] for r in report.values())
    print(f"target: migration stall <= {STALL_TARGET:.0f}x the median inter-token time: "
          f"{'met' if worst <= STALL_TARGET else 'MISS'} (worst {worst:.1f}x)")
    if args.json:
        print(json.dumps({"transports": report, "settings": vars(args)}))


if __name__ == "__main__":
    main()
