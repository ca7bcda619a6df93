"""What TLS costs: TTFT and TPOT of 8 concurrent streams, TLS on against off, in one run.

Two `tandem serve` processes run side by side, each with 1 prefill and 1 decode worker handing
KV over gRPC (so the internal hop is the gRPC stream):
- `plain`: no TLS anywhere, no API key;
- `tls`: the gateway under TLS with client certificates (mTLS) and an API key, and the KV hop
  under the cluster's mTLS (`worker.tls`), all with certificates `tandem certs` makes.
Rounds alternate between them (plain, tls, plain, tls, ...) so drift on a busy machine hits both
alike; a round starts `--streams` (8) streaming requests at once, each a `--prompt-len`-token
prompt (distinct per request: no prefix reuse) and `--max-tokens` greedy tokens, EOS ignored.
TTFT is the time to the first chunk with tokens, TPOT the mean time per token after it, both
measured in the client. Progress goes to stderr; `--json` prints one object on the last line.

    python bench/tls.py [--rounds 3] [--streams 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tandem.client import Client
from tandem.tls import make_dev_certs

READY = "ready grpc="
KEY = "bench-key"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Served:
    """One `tandem serve` process, from a YAML config."""

    def __init__(self, name: str, config: str, directory: Path) -> None:
        self.name = name
        path = directory / f"{name}.yaml"
        path.write_text(config)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "serve", "--config", str(path)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.address: str | None = None
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                if line.startswith(READY):
                    self.address = line[len(READY):].strip()
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(600):
            self.stop()
            raise SystemExit(f"error: the {name} server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def config(certs: dict[str, Path] | None) -> str:
    lines = ["prefill_workers: 1", "decode_workers: 1",
             "worker:", "  kv_transport: grpc", "  kv_store: {enabled: false}",
             "  engine: {num_threads: 1}"]
    if certs:
        lines.append(f"  tls: {{ca: {certs['ca.pem']}, cert: {certs['node.pem']}, "
                     f"key: {certs['node.key']}}}")
    gateway = "gateway: {port: 0"
    if certs:
        gateway += (f", api_keys: [{KEY}], tls: {{cert: {certs['node.pem']}, "
                    f"key: {certs['node.key']}, client_ca: {certs['ca.pem']}}}")
    return "\n".join([*lines, gateway + "}"]) + "\n"


def client(served: Served, certs: dict[str, Path] | None) -> Client:
    if certs is None:
        return Client(served.address, timeout=300)
    return Client(served.address, timeout=300, tls=True, api_key=KEY,
                  root_certificates=certs["ca.pem"].read_bytes(),
                  client_certificate=certs["node.pem"].read_bytes(),
                  client_key=certs["node.key"].read_bytes())


def one_stream(c: Client, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    first = last = None
    tokens = 0
    for chunk in c.stream(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True):
        if chunk.token_ids:
            now = time.perf_counter()
            first = first or now
            last, tokens = now, tokens + len(chunk.token_ids)
    if first is None or tokens < 2:
        raise RuntimeError("a stream produced fewer than 2 tokens")
    return first - started, (last - first) / (tokens - 1)


def round_of(c: Client, streams: int, prompt_len: int, max_tokens: int, seed: int) \
        -> list[tuple[float, float]]:
    prompts = [[1000 + (seed * 7919 + i * 104729 + j * 31) % 40000 for j in range(prompt_len)]
               for i in range(streams)]
    with ThreadPoolExecutor(streams) as pool:
        return list(pool.map(lambda p: one_stream(c, p, max_tokens), prompts))


def summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    ttft = sorted(s[0] for s in samples)
    tpot = sorted(s[1] for s in samples)

    def p90(xs: list[float]) -> float:
        return xs[min(len(xs) - 1, int(0.9 * len(xs)))]

    return {"ttft_p50_ms": statistics.median(ttft) * 1e3, "ttft_p90_ms": p90(ttft) * 1e3,
            "tpot_p50_ms": statistics.median(tpot) * 1e3, "tpot_p90_ms": p90(tpot) * 1e3,
            "requests": len(samples)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams a round")
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="tandem-bench-tls-"))
    certs = make_dev_certs(directory / "certs")
    log("starting both servers (plain, tls)")
    servers = {"plain": Served("plain", config(None), directory)}
    try:
        servers["tls"] = Served("tls", config(certs), directory)
        clients = {"plain": client(servers["plain"], None), "tls": client(servers["tls"], certs)}
        for name, c in clients.items():  # warm up: first requests pay for connections
            round_of(c, 2, 32, 4, seed=-1)
            log(f"{name} at {servers[name].address} warmed up")
        samples: dict[str, list[tuple[float, float]]] = {"plain": [], "tls": []}
        for r in range(args.rounds):
            for name, c in clients.items():
                started = time.perf_counter()
                samples[name] += round_of(c, args.streams, args.prompt_len, args.max_tokens,
                                          seed=r * 2 + (name == "tls"))
                log(f"round {r + 1}/{args.rounds} {name}: {time.perf_counter() - started:.1f} s")
    finally:
        for served in servers.values():
            served.stop()
    report: dict[str, Any] = {name: summary(s) for name, s in samples.items()}
    report["tls_vs_plain"] = {k: report["tls"][k] / report["plain"][k]
                              for k in ("ttft_p50_ms", "tpot_p50_ms")}
    report["settings"] = vars(args)
    print(f"{args.streams} concurrent streams, {args.rounds} rounds each, prompts of "
          f"{args.prompt_len} tokens, {args.max_tokens} tokens out")
    print(f"{'mode':<6} {'TTFT p50':>10} {'TTFT p90':>10} {'TPOT p50':>10} {'TPOT p90':>10}")
    for name in ("plain", "tls"):
        s = report[name]
        print(f"{name:<6} {s['ttft_p50_ms']:>8.0f}ms {s['ttft_p90_ms']:>8.0f}ms "
              f"{s['tpot_p50_ms']:>8.1f}ms {s['tpot_p90_ms']:>8.1f}ms")
    ratio = report["tls_vs_plain"]
    print(f"tls / plain: TTFT {ratio['ttft_p50_ms']:.3f}x, TPOT {ratio['tpot_p50_ms']:.3f}x")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
