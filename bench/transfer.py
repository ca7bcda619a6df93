"""KV handoff between two processes: bandwidth (memcpy vs gRPC vs NIXL) and the handoff time
that prefill does not hide (layer-wise streaming vs one piece).

Two processes on this machine, each a real worker with one torch thread and UCX on loopback
(`UCX_NET_DEVICES=lo`): this one runs `PrefillWorker`s (the senders), a child process runs a
`DecodeWorker` (the receiver: its KV pool, its NIXL agent and gRPC server). The KV is that of the
shipped model (bf16: 22.5 KiB per token) for prompts of `--sizes` tokens.

- Bandwidth: the KV of an n-token prompt, already in the prefill worker's blocks, moved into
  blocks the decode worker reserved, in one piece; the time runs from posting the piece until the
  decode worker confirmed it (checksums on both sides included). The baseline, memcpy, copies the
  same blocks into shared memory that the decode process maps (one copy, no checks). Median of
  `--repeats`.
- Exposed handoff: a real prefill of an n-token prompt on a prefill worker, handing its KV to the
  decode worker layer by layer (while it computes) or in one piece (after it). Exposed = first
  token sampled -> decode worker confirmed (`PrefillResult.handoff_s`); reported in ms and as a
  fraction of the prefill time. Prefix caching is off so every repeat computes. Median.
- `--crossover` sizes: the exposed time of both modes on short prompts, to see where streaming
  layer by layer starts to pay (the worker default `layerwise_min_tokens` comes from this).

Targets: NIXL >= 25% of memcpy bandwidth; exposed handoff <= 5% of prefill time at 2048 tokens.

    python bench/transfer.py [--json]              # ~3 minutes on 2 cores
    python bench/transfer.py --sizes 512 2048 --repeats 2 --crossover

A table goes to stdout, progress to stderr; with `--json` the last line is one JSON object:
`memcpy_gbps`, `grpc_gbps`, `nixl_gbps`, `exposed_frac_layerwise`, `exposed_frac_onepiece`,
`exposed_ms_layerwise`, `exposed_ms_onepiece` (2048 tokens, over the best transport) and every
size under `sizes`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from multiprocessing.shared_memory import SharedMemory
from typing import Any

os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from tandem.decode_worker.worker import DecodeWorker
from tandem.engine.config import EngineConfig
from tandem.engine.sampling_params import SamplingParams
from tandem.prefill_worker.worker import PrefillWorker
from tandem.transfer import nixl_problem
from tandem.transfer.base import Handoff, KVTarget
from tandem.worker_base import WorkerConfig

ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0)
CONTEXT = 8192  # SmolLM2-135M
TARGET_NIXL_VS_MEMCPY = 0.25
TARGET_EXPOSED_FRAC = 0.05


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def worker_config(max_tokens: int, streaming: str = "auto") -> WorkerConfig:
    kv_gb = 2.5 * max_tokens * 22.5 * 1024 / 2**30 + 0.05
    return WorkerConfig(
        engine=EngineConfig(num_threads=1, kv_cache_gb=kv_gb, enable_prefix_caching=False),
        kv_streaming=streaming, host="127.0.0.1")


# -- the decode process ------------------------------------------------------------------------

def decode_process(conn, max_tokens: int) -> None:
    asyncio.run(_serve_decode(conn, max_tokens))


async def _serve_decode(conn, max_tokens: int) -> None:
    worker = DecodeWorker(worker_config(max_tokens), "bench")
    info = await worker.start()
    shms: dict[int, SharedMemory] = {}
    conn.send(info.kv_receivers)
    while True:
        command, *args = await asyncio.to_thread(conn.recv)
        if command == "reserve":
            request_id, prompt = args
            conn.send(await worker.reserve(request_id, prompt, ONE_TOKEN))
        elif command == "forget":
            await worker.abort(args[0])
            conn.send(None)
        elif command == "admit":  # a sender's introduction, as Ray would carry it
            await worker.admit_kv_sender(*args)
            conn.send(None)
        elif command == "shm":  # the memcpy baseline's destination, mapped here
            if args[0] not in shms:
                shms[args[0]] = SharedMemory(create=True, size=args[0])
            conn.send(shms[args[0]].name)
        elif command == "stop":
            for shm in shms.values():
                shm.close()
                shm.unlink()
            await worker.shutdown()
            conn.send(None)
            return


class PipeControl:
    """The decode process's stand-in for a Ray actor handle: `admit_kv_sender.remote(...)`."""

    def __init__(self, decode: Decode) -> None:
        self.decode = decode
        self.admit_kv_sender = self

    def remote(self, transport: str, introduction: bytes) -> Any:
        return self.decode.ask("admit", transport, introduction)


class Decode:
    def __init__(self, max_tokens: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=decode_process, args=(child, max_tokens), daemon=True)
        self.process.start()
        # Senders introduce themselves to the decode worker through its control handle (Ray in
        # a cluster); here the pipe stands in for it.
        self.receivers = [dataclasses.replace(r, control=PipeControl(self))
                          for r in self.conn.recv()]

    async def ask(self, *command: Any) -> Any:
        self.conn.send(command)
        return await asyncio.to_thread(self.conn.recv)

    async def stop(self) -> None:
        await self.ask("stop")
        self.process.join(30)


# -- measurements --------------------------------------------------------------------------------

def prompt_of(n: int, salt: int) -> list[int]:
    """n token ids; n - 1 when n is the model's whole context (8192), which leaves no room
    for the first token: the KV is then one token shorter, in the same number of blocks."""
    g = torch.Generator().manual_seed(salt)
    return torch.randint(1000, 40000, (min(n, CONTEXT - 1),), generator=g).tolist()


async def memcpy_seconds(worker: PrefillWorker, decode: Decode, n: int) -> float:
    cache = worker.engine.engine.cache
    blocks = cache.spec.num_blocks_for(n)
    src = cache.data[:, :, :blocks]
    shm = SharedMemory(name=await decode.ask("shm", src.numel() * src.element_size()))
    try:
        dst = torch.frombuffer(shm.buf, dtype=src.dtype).view(src.shape)
        dst.copy_(src)  # fault the pages in first, as a reserved pool would be
        started = time.perf_counter()
        dst.copy_(src)
        elapsed = time.perf_counter() - started
        del dst
        return elapsed
    finally:
        shm.close()


async def move_seconds(worker: PrefillWorker, decode: Decode, transport: str, n: int,
                       request_id: str) -> float:
    """One-piece move of n tokens of KV already in the prefill pool, until confirmed."""
    engine = worker.engine.engine
    prompt = prompt_of(n, 0)
    blocks = await decode.ask("reserve", request_id, prompt)
    receiver = next(r for r in decode.receivers if r.transport == transport)
    session = worker.transports[transport].open_session(
        engine.cache, engine.fingerprint, KVTarget(receiver, tuple(blocks), len(prompt)),
        request_id)
    started = time.perf_counter()
    session.post(range(engine.kv_spec.num_layers), 0, list(range(len(blocks))))
    await session.finish(Handoff(request_id, [1]), timeout=60)
    elapsed = time.perf_counter() - started
    await decode.ask("forget", request_id)
    return elapsed


async def exposed(worker: PrefillWorker, decode: Decode, transport: str, n: int,
                  request_id: str) -> tuple[float, float]:
    """(prefill s, exposed handoff s) of one real prefill."""
    prompt = prompt_of(n, hash(request_id) % 2**31)
    blocks = await decode.ask("reserve", request_id, prompt)
    receiver = next(r for r in decode.receivers if r.transport == transport)
    result = await worker.prefill(request_id, prompt, ONE_TOKEN, receiver, blocks)
    assert result.transport == transport
    await decode.ask("forget", request_id)
    return result.prefill_s, result.handoff_s


async def handoff_rows(workers: dict[str, PrefillWorker], decode: Decode,
                       transports: list[str], n: int, repeats: int) -> dict[str, float]:
    """Prefill and exposed handoff per transport and mode, medians; the modes alternate run by
    run so that drift on a busy machine hits both alike."""
    runs: dict[str, list[tuple[float, float]]] = {}
    for _ in range(repeats):
        for t in transports:
            for mode, worker in workers.items():
                runs.setdefault(f"{t}_{mode}", []).append(
                    await exposed(worker, decode, t, n, f"{t}-{mode}-{n}-{uuid.uuid4().hex}"))
    row = {}
    for key, samples in runs.items():
        prefill_s = statistics.median(r[0] for r in samples)
        exposed_s = statistics.median(r[1] for r in samples)
        row[f"{key}_prefill_ms"] = prefill_s * 1e3
        row[f"{key}_exposed_ms"] = exposed_s * 1e3
        row[f"{key}_exposed_frac"] = exposed_s / prefill_s
    return row


async def run(args: argparse.Namespace) -> dict[str, Any]:
    transports = ["grpc"] + ([] if nixl_problem() else ["nixl"])
    if len(transports) == 1:
        log(f"warning: {nixl_problem()}")
    top = max(args.sizes + args.crossover_sizes)
    log("starting the decode process and two prefill workers (layer-wise, one piece)")
    decode = Decode(top)
    workers = {mode: PrefillWorker(worker_config(top, mode), "bench")
               for mode in ("layerwise", "onepiece")}
    for worker in workers.values():
        await worker.start()
        for t in transports:  # one-piece moves below open sessions without a prefill
            await decode.ask("admit", t, worker.transports[t].introduction())
    mover = workers["onepiece"]
    spec = mover.engine.engine.kv_spec
    report: dict[str, Any] = {"sizes": {}, "crossover": {}, "transports": transports}
    try:
        for n in args.sizes:
            row: dict[str, Any] = {"bytes": spec.num_blocks_for(n) * spec.bytes_per_block}
            log(f"{n} tokens: bandwidth")
            memcpy = [await memcpy_seconds(mover, decode, n) for _ in range(args.repeats)]
            row["memcpy_gbps"] = row["bytes"] / statistics.median(memcpy) / 1e9
            for t in transports:
                times = [await move_seconds(mover, decode, t, n, f"bw-{uuid.uuid4().hex}")
                         for i in range(args.repeats + 1)][1:]  # the first connects
                row[f"{t}_gbps"] = row["bytes"] / statistics.median(times) / 1e9
            reps = args.repeats if n <= 2048 else 1
            log(f"{n} tokens: prefill + handoff, layer-wise and one piece (x{reps})")
            row.update(await handoff_rows(workers, decode, transports, n, reps))
            report["sizes"][str(n)] = row
        for n in args.crossover_sizes:
            log(f"crossover: {n} tokens")
            report["crossover"][str(n)] = await handoff_rows(workers, decode, transports, n,
                                                             args.repeats)
    finally:
        for worker in workers.values():
            await worker.shutdown()
        await decode.stop()
    best = transports[-1]
    main = report["sizes"].get("2048") or report["sizes"][str(args.sizes[-1])]
    report.update({
        "memcpy_gbps": main["memcpy_gbps"], "grpc_gbps": main["grpc_gbps"],
        "nixl_gbps": main.get("nixl_gbps"), "transport": best,
        "exposed_frac_layerwise": main[f"{best}_layerwise_exposed_frac"],
        "exposed_frac_onepiece": main[f"{best}_onepiece_exposed_frac"],
        "exposed_ms_layerwise": main[f"{best}_layerwise_exposed_ms"],
        "exposed_ms_onepiece": main[f"{best}_onepiece_exposed_ms"],
        "prefill_ms": main[f"{best}_layerwise_prefill_ms"],
    })
    return report


def print_table(report: dict[str, Any]) -> None:
    transports = report["transports"]
    print("bandwidth, GB/s (one piece, until confirmed; memcpy: one copy into shared memory)")
    print(f"{'tokens':>7} {'MB':>7} {'memcpy':>8} " + " ".join(f"{t:>8}" for t in transports)
          + "  nixl/memcpy")
    for n, row in report["sizes"].items():
        ratio = row.get("nixl_gbps", 0) / row["memcpy_gbps"]
        print(f"{n:>7} {row['bytes'] / 1e6:7.1f} {row['memcpy_gbps']:8.2f} "
              + " ".join(f"{row[f'{t}_gbps']:8.2f}" for t in transports) + f"  {ratio:10.0%}")
    print("\nexposed handoff after prefill: ms (fraction of prefill time)")
    print(f"{'tokens':>7} {'transport':>9} {'prefill ms':>10} {'layer-wise':>18} {'one piece':>18}")
    for n, row in report["sizes"].items():
        for t in transports:
            lw, op = f"{t}_layerwise", f"{t}_onepiece"
            print(f"{n:>7} {t:>9} {row[f'{lw}_prefill_ms']:10.0f} "
                  f"{row[f'{lw}_exposed_ms']:9.1f} ({row[f'{lw}_exposed_frac']:6.2%}) "
                  f"{row[f'{op}_exposed_ms']:9.1f} ({row[f'{op}_exposed_frac']:6.2%})")
    if report["crossover"]:
        print("\ncrossover: prefill + exposed handoff ms (what TTFT pays), layer-wise / one piece")
        for n, row in report["crossover"].items():
            cells = []
            for t in transports:
                lw, op = (row[f"{t}_{m}_prefill_ms"] + row[f"{t}_{m}_exposed_ms"]
                          for m in ("layerwise", "onepiece"))
                cells.append(f"{t}: {lw:7.1f} / {op:7.1f}")
            print(f"{n:>7} " + "  ".join(cells))
    nixl = report.get("nixl_gbps")
    print("\ntargets (2048 tokens):")
    if nixl is not None:
        ok = nixl / report["memcpy_gbps"] >= TARGET_NIXL_VS_MEMCPY
        print(f"  NIXL >= 25% of memcpy: {nixl / report['memcpy_gbps']:.0%} "
              f"{'met' if ok else 'NOT met'}")
    frac = report["exposed_frac_layerwise"]
    print(f"  exposed <= 5% of prefill ({report['transport']}, layer-wise): {frac:.2%} "
          f"{'met' if frac <= TARGET_EXPOSED_FRAC else 'NOT met'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crossover", action="store_true",
                        help="also measure short prompts (32-512 tokens)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.crossover_sizes = [32, 64, 128, 256, 512] if args.crossover else []
    torch.set_num_threads(1)
    report = asyncio.run(run(args))
    print_table(report)
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
