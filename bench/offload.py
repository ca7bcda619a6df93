"""Attention offload: step time against local decode, the channel's round trip, and how far
the attention pool grows what a decode worker serves.

1. Step time (bf16): `--batches` x `--contexts` sequences decode with their KV
   - local: one engine, 2 torch threads, KV in its own pool;
   - offloaded: the engine at 1 thread runs the dense layers; `--attention-workers` (2)
     attention worker processes at 1 thread each hold the KV, each sequence split over them by
     token range (DistAttention), and run attention over the attention channel (loopback
     TCP), with the ping-pong pipeline off (1 micro-batch) and on (2).
   KV contents are zeros (the timing does not depend on them); a pair whose KV would not fit in
   memory twice (`--max-kv-gb`) is skipped and listed. Target: batch 16, 2k context,
   offloaded with the pipeline <= 1.3x local.
2. Round trip per layer (batch 1, 512-token range): the attention channel, a Ray actor call
   per layer (what the channel replaces), and the in-process call (the floor).
3. Capacity (`bench/offload_capacity.py`): real clusters (fp32, 1 thread a worker) with 0, 1, 2
   and 4 attention workers of the decode worker's KV budget: the largest batch admitted at
   once and completed with tokens identical to one engine's, and the inter-token time.
   Target: x3.5 from 1 to 4 attention workers.
Correctness of offloaded decoding (identical greedy tokens, fp32) is checked first, in-process
over the channel, and the run fails if it does not hold.

    python bench/offload.py [--json] [--batches 1 16 64] [--contexts 512 2048 8000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

# As `tandem serve` runs Ray (token auth), set before Ray is imported: it reads it then.
os.environ.setdefault("RAY_AUTH_MODE", "token")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from offload_capacity import measure_capacity  # bench/, next to this script

from tandem.attention_worker.channel_client import ChannelClient
from tandem.attention_worker.channel_server import ChannelServer
from tandem.attention_worker.range_kv import RangeKV
from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.host_memory import keep_freed_memory
from tandem.engine.kv_cache import KVSpec
from tandem.engine.loader import load_model
from tandem.engine.offload import OffloadedSequence
from tandem.engine.sampling_params import SamplingParams

BLOCK = 16
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)  # warm-up + steps <= 8


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def holder_main(conn, spec_json: str, num_blocks: int) -> None:
    """An attention worker process for the bench: the channel server, plus a pipe to fill
    ranges with zero KV of any length at once (the channel grows ranges token by token)."""
    torch.set_num_threads(1)
    keep_freed_memory()  # as an attention worker does
    kv, lock = RangeKV(KVSpec.model_validate_json(spec_json), num_blocks), threading.Lock()
    server = ChannelServer(kv, lock, "127.0.0.1")
    conn.send(server.address)
    while (cmd := conn.recv()) != "stop":
        op, *args = cmd
        with lock:
            if op == "hold":
                seq_id, first, tokens, room = args
                kv.open(seq_id, first)
                kv.grow(seq_id, tokens)
                kv.reserve_room(seq_id, room)
            elif op == "clear":
                for seq_id in list(kv.ranges):
                    kv.free(seq_id)
        conn.send("ok")
    server.close()


class HolderProcess:
    def __init__(self, spec: KVSpec, num_blocks: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=holder_main, args=(child, spec.model_dump_json(),
                                                          num_blocks), daemon=True)
        self.proc.start()
        self.address = self.conn.recv()

    def call(self, *cmd) -> None:
        self.conn.send(cmd)
        assert self.conn.recv() == "ok"

    def stop(self) -> None:
        self.conn.send("stop")
        self.proc.join(30)


def engine(loaded, threads: int, blocks: int, micro_batches: int = 2) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="bfloat16", num_threads=threads, num_kv_blocks=blocks,
                                  block_size=BLOCK, max_num_seqs=64,
                                  max_num_batched_tokens=8192, cuda_graphs=False,
                                  offload_micro_batches=micro_batches), loaded=loaded)


def time_steps(e: LLMEngine, steps: int) -> float:
    e.step()  # warm-up (tables, allocator)
    started = time.perf_counter()
    for _ in range(steps):
        e.step()
    return (time.perf_counter() - started) / steps


def local_step(loaded, batch: int, context: int, steps: int) -> float:
    blocks = batch * -(-(context + GREEDY.max_tokens) // BLOCK)
    e = engine(loaded, 2, blocks)
    for i in range(batch):
        e.reserve(f"r{i}", [1] * context, GREEDY)
        e.adopt(f"r{i}", None, [1])  # KV in place (zeros): only the timing matters here
    return time_steps(e, steps)


def offloaded_step(loaded, holders: list[HolderProcess], batch: int, context: int,
                   steps: int, micro_batches: int) -> tuple[float, list[ChannelClient]]:
    """Each sequence's KV split by token range over `holders` (DistAttention), the tail on
    the last; the decode engine at 1 thread."""
    torch.set_num_threads(1)
    e = engine(loaded, 1, 4, micro_batches)
    clients = [ChannelClient(h.address, f"bench-{i}", 60.0) for i, h in enumerate(holders)]
    share = -(-context // len(holders) // BLOCK) * BLOCK  # block-aligned ranges
    for h in holders:
        h.call("clear")
    for i in range(batch):
        for j, h in enumerate(holders):
            first = j * share
            tokens = min(share, context - first) if j < len(holders) - 1 else context - first
            h.call("hold", f"o{i}", first, tokens,
                   GREEDY.max_tokens if j == len(holders) - 1 else 0)
        e.adopt_offloaded(f"o{i}", [1] * context, [1], GREEDY,
                          OffloadedSequence(f"o{i}", list(clients)))
    seconds = time_steps(e, steps)
    return seconds, clients


def check_identical(loaded_fp32) -> bool:
    """Greedy tokens of offloaded decode over the channel equal local decode's (fp32)."""
    config = EngineConfig(dtype="float32", num_threads=2, kv_cache_gb=0.05)
    prompts = [list(range(300, 364)), list(range(900, 940))]
    ref = LLMEngine(config, loaded=loaded_fp32)
    for i, p in enumerate(prompts):
        ref.add_request(f"r{i}", p, SamplingParams(max_tokens=16, temperature=0,
                                                   ignore_eos=True))
    want = {}
    while ref.has_unfinished_requests():
        want.update({o.request_id: o.token_ids for o in ref.step() if o.finished})
    e = LLMEngine(config, loaded=loaded_fp32)
    holders = [RangeKV(e.kv_spec, 16), RangeKV(e.kv_spec, 16)]
    servers = [ChannelServer(h, threading.Lock(), "127.0.0.1") for h in holders]
    clients = [ChannelClient(s.address, f"h{i}", 30.0) for i, s in enumerate(servers)]
    for i, p in enumerate(prompts):
        e.add_request("p", p, SamplingParams(max_tokens=1, temperature=0), prefill_only=True)
        first = []
        while not first:
            first = [o.token_ids for o in e.step() if o.request_id == "p"]
        kv = e.export_kv("p")
        e.release("p")
        data = kv.data.flatten(2, 3)[:, :, :kv.num_tokens]
        cut = 32  # the first sequence split over both holders
        plan = [(holders[0], 0, cut), (holders[1], cut, len(p))] if i == 0 else \
            [(holders[1], 0, len(p))]
        for holder, lo, hi in plan:
            holder.open(f"r{i}", lo)
            slots = holder.grow(f"r{i}", hi - lo)
            for layer in range(data.shape[0]):
                holder.write(layer, slots, data[layer, 0, lo:hi], data[layer, 1, lo:hi])
        used = clients if i == 0 else clients[1:]
        e.adopt_offloaded(f"r{i}", p, first[0], SamplingParams(
            max_tokens=16, temperature=0, ignore_eos=True), OffloadedSequence(f"r{i}", used))
    got = {}
    while e.has_unfinished_requests():
        got.update({o.request_id: o.token_ids for o in e.step() if o.finished})
    for s in servers:
        s.close()
    return got == want


def round_trips(spec: KVSpec, samples: int) -> dict[str, float]:
    """Mean per-layer round trip, seconds: the channel, a Ray call, in-process."""
    import ray

    kv = RangeKV(spec, 64)
    kv.open("s", 0)
    kv.grow("s", 512)
    q = torch.zeros(1, 9, spec.head_dim, dtype=torch.bfloat16)
    holder = HolderProcess(spec, 64)
    holder.call("hold", "s", 0, 512, 0)
    client = ChannelClient(holder.address, "rtt", 30.0)
    out = {}
    for name, call in [("in_process", lambda: kv.attend(0, ["s"], q, 0.125)),
                       ("channel", lambda: client.request_attend(0, ["s"], q, 0.125).result())]:
        call()
        started = time.perf_counter()
        for _ in range(samples):
            call()
        out[name] = (time.perf_counter() - started) / samples
    holder.stop()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        actor = ray.remote(RayHolder).options(num_cpus=0).remote(spec.model_dump_json())
        ray.get(actor.attend.remote(q))
        started = time.perf_counter()
        for _ in range(samples):
            ray.get(actor.attend.remote(q))
        out["ray_call"] = (time.perf_counter() - started) / samples
    finally:
        ray.shutdown()
    return out


class RayHolder:
    def __init__(self, spec_json: str) -> None:
        torch.set_num_threads(1)
        self.kv = RangeKV(KVSpec.model_validate_json(spec_json), 64)
        self.kv.open("s", 0)
        self.kv.grow("s", 512)

    def attend(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv.attend(0, ["s"], q, 0.125)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8000])
    p.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up), "
                   "at most 6")
    p.add_argument("--max-kv-gb", type=float, default=3.2)
    p.add_argument("--rtt-samples", type=int, default=300)
    p.add_argument("--attention-workers", type=int, default=2, help="attention worker "
                   "processes (1 thread each) each sequence's KV is split over, by token range")
    p.add_argument("--skip-capacity", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    loaded_fp32 = load_model(None, torch.float32, torch.device("cpu"))
    identical = check_identical(loaded_fp32)
    log(f"offloaded greedy tokens identical to local (fp32): {identical}")
    del loaded_fp32
    loaded = load_model(None, torch.bfloat16, torch.device("cpu"))
    spec = KVSpec(num_layers=loaded.config.num_layers, num_kv_heads=loaded.config.num_kv_heads,
                  head_dim=loaded.config.head_dim, dtype="bfloat16", block_size=BLOCK)
    rows, skipped = [], []
    for context in args.contexts:
        for batch in args.batches:
            kv_gb = batch * (context + args.steps + 2) * spec.bytes_per_token / 2**30
            if kv_gb > args.max_kv_gb:
                skipped.append({"batch": batch, "context": context, "kv_gb": round(kv_gb, 2)})
                continue
            blocks = batch * -(-(context + GREEDY.max_tokens) // BLOCK)
            holders = [HolderProcess(spec, blocks) for _ in range(args.attention_workers)]
            try:
                local = local_step(loaded, batch, context, args.steps)
                row = {"batch": batch, "context": context, "local_s": local,
                       "local_tok_s": batch / local}
                for name, mb in [("offload_nopipe", 1), ("offload_pipe", 2)]:
                    seconds, clients = offloaded_step(loaded, holders, batch, context,
                                                      args.steps, mb)
                    row[f"{name}_s"] = seconds
                    row[f"{name}_tok_s"] = batch / seconds
                    row[f"{name}_x_local"] = seconds / local
                    row[f"{name}_layer_rtt_s"] = statistics.mean(
                        c.stats.mean_round_trip_s for c in clients)
                    for c in clients:
                        c.close()
            finally:
                for h in holders:
                    h.stop()
            rows.append(row)
            log(f"b{batch} ctx{context}: local {local * 1e3:.1f} ms, offloaded "
                f"{row['offload_nopipe_s'] * 1e3:.1f} ms (no pipeline) / "
                f"{row['offload_pipe_s'] * 1e3:.1f} ms (ping-pong) = "
                f"{row['offload_pipe_x_local']:.2f}x local")
    rtt = round_trips(spec, args.rtt_samples)
    log("per-layer round trip: " + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in rtt.items()))
    capacity = None if args.skip_capacity else measure_capacity(log)
    target = next((r for r in rows if r["batch"] == 16 and r["context"] == 2048), None)
    result = {
        "identical_tokens": identical,
        "step_time": rows, "skipped_for_memory": skipped,
        "layer_round_trip_s": {**rtt, "shared_memory": None},
        "target_b16_2k_x_local": target["offload_pipe_x_local"] if target else None,
        "target_met_step": bool(target and target["offload_pipe_x_local"] <= 1.3),
        "capacity": capacity,
        "median_pipe_x_local": statistics.median(r["offload_pipe_x_local"] for r in rows)
        if rows else None,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
