"""Tiered KV store: put/get throughput per tier, and the TTFT a cached prefix buys.

One process, the shipped model (bf16, like the workers: 22.5 KiB of KV per token) with one torch
thread, real tiers: host memory, files in `--ssd-dir`, and a redis-server started here on
loopback.

- Throughput: the KV of a 2,048-token prompt as eight 256-token chunks, written to and read
  from each tier the way the store does it: put = encode the object (header, per-layer
  checksums) + write it; get = read it + check and decode it. GB/s of KV bytes, median of
  `--repeats`. Baseline: memcpy of the same bytes. SSD reads are cold: each file is dropped
  from the page cache (posix_fadvise DONTNEED) before it is read.
- TTFT: a 2,048-token prompt whose first 1,792 tokens (7 chunks) are cached in one tier:
  load them from the tier, then prefill the remaining 256 tokens and sample the first token;
  vs prefilling all 2,048 tokens (no cache). The engine's own prefix cache is off. Median.

Targets: TTFT with a CPU-tier hit >= 5x faster than recompute, with a Redis hit >= 3x.

    python bench/store.py [--json] [--repeats 3] [--ssd-dir DIR]

A table goes to stdout, progress to stderr; with `--json` the last line is one JSON object with
`{cpu,ssd,redis}_{get,put}_gbps`, `memcpy_gbps`, `ttft_{none,cpu,ssd,redis}_s` and
`ttft_speedup_{cpu,ssd,redis}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tandem.cluster.redis_server import RedisServer
from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.kv_cache import KVBlocks
from tandem.engine.sampling_params import SamplingParams
from tandem.kv_store.codec import get_codec
from tandem.kv_store.kv_object import decode_object, encode_object
from tandem.kv_store.store import TieredStore
from tandem.kv_store.tiers.base import Tier
from tandem.kv_store.tiers.memory import MemoryTier
from tandem.kv_store.tiers.redis import RedisTier
from tandem.kv_store.tiers.ssd import SsdTier

PROMPT_TOKENS, CACHED_TOKENS, CHUNK = 2048, 1792, 256
ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0)
TARGETS = {"cpu": 5.0, "redis": 3.0}
GB = 2**30


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prompt() -> list[int]:
    return [1000 + (i * 104729) % 40000 for i in range(PROMPT_TOKENS)]


def ttft(engine: LLMEngine, ids: list[int], store: TieredStore | None) -> float:
    """Seconds from the request to its first token, loading the cached prefix from `store`."""
    start = time.perf_counter()
    cached = store.load_prefix(ids) if store is not None else None
    if store is not None and (cached is None or cached.num_tokens != CACHED_TOKENS):
        raise RuntimeError(f"expected {CACHED_TOKENS} cached tokens, got "
                           f"{cached.num_tokens if cached else 0}")
    engine.add_request("bench", ids, ONE_TOKEN, prefill_only=True, prefix_kv=cached)
    while not engine.step():
        pass
    elapsed = time.perf_counter() - start
    engine.release("bench")
    return elapsed


def drop_page_cache(tier: Tier) -> None:
    if isinstance(tier, SsdTier):
        for path in tier.directory.glob("*.kv"):
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def throughput(tier: Tier, chunks: list[tuple[str, KVBlocks]], engine: LLMEngine,
               repeats: int) -> tuple[float, float]:
    """(put GB/s, get GB/s) of `chunks` through `tier`, as the store encodes and decodes."""
    codec = get_codec("raw")
    nbytes = sum(kv.data.numel() * kv.data.element_size() for _, kv in chunks)
    puts, gets = [], []
    for _ in range(repeats):
        for key, _ in chunks:
            tier.remove(key)
        start = time.perf_counter()
        for key, kv in chunks:
            tier.put(key, encode_object(kv, engine.fingerprint, codec))
        if isinstance(tier, SsdTier):
            os.sync()  # the bytes are on the device, not just in the page cache
        puts.append(time.perf_counter() - start)
        drop_page_cache(tier)
        start = time.perf_counter()
        for key, _ in chunks:
            decode_object(tier.get(key), engine.fingerprint, engine.kv_spec)
        gets.append(time.perf_counter() - start)
    return nbytes / statistics.median(puts) / 1e9, nbytes / statistics.median(gets) / 1e9


def memcpy_gbps(chunks: list[tuple[str, KVBlocks]], repeats: int) -> float:
    nbytes = sum(kv.data.numel() * kv.data.element_size() for _, kv in chunks)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _, kv in chunks:
            kv.data.clone()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ssd-dir", type=Path, default=None,
                        help="directory of the SSD tier (default: a temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    log("loading the model (bf16, 1 thread)")
    engine = LLMEngine(EngineConfig(num_threads=1, kv_cache_gb=0.25,
                                    enable_prefix_caching=False))
    ids = prompt()
    log(f"computing the KV of {PROMPT_TOKENS} tokens")
    engine.add_request("kv", ids, ONE_TOKEN, prefill_only=True)
    while not engine.step():
        pass
    full = engine.export_kv("kv")
    engine.release("kv")
    per = CHUNK // engine.kv_spec.block_size
    probe = TieredStore([], engine.fingerprint, engine.kv_spec, chunk_tokens=CHUNK)
    keys = probe.prefix_keys(ids)
    chunks = [(key, KVBlocks(engine.kv_spec, CHUNK, full.data[:, :, i * per:(i + 1) * per]
                             .contiguous())) for i, key in enumerate(keys)]
    probe.close()

    redis = RedisServer(2 * GB).start()
    with tempfile.TemporaryDirectory(dir=args.ssd_dir) as ssd_dir:
        tiers: dict[str, Tier] = {
            "cpu": MemoryTier("cpu", 2 * GB), "ssd": SsdTier(Path(ssd_dir), 2 * GB),
            "redis": RedisTier(redis.url, 2 * GB)}
        results: dict[str, float] = {"memcpy_gbps": memcpy_gbps(chunks, args.repeats)}
        for name, tier in tiers.items():
            log(f"{name}: put/get of {len(chunks)} chunks x {args.repeats}")
            put, get = throughput(tier, chunks, engine, args.repeats)
            results[f"{name}_put_gbps"], results[f"{name}_get_gbps"] = put, get

        log(f"TTFT without a cache ({PROMPT_TOKENS} tokens) x {args.repeats}")
        results["ttft_none_s"] = statistics.median(
            ttft(engine, ids, None) for _ in range(args.repeats))
        for name, tier in tiers.items():
            store = TieredStore([tier], engine.fingerprint, engine.kv_spec, chunk_tokens=CHUNK,
                                promote_on_hit=False)
            for key, kv in chunks[:CACHED_TOKENS // CHUNK]:
                store.put(key, kv)
            store.flush(120)
            times = []
            for _ in range(args.repeats):
                drop_page_cache(tier)
                times.append(ttft(engine, ids, store))
            results[f"ttft_{name}_s"] = statistics.median(times)
            results[f"ttft_speedup_{name}"] = results["ttft_none_s"] / results[f"ttft_{name}_s"]
            log(f"{name}: TTFT {results[f'ttft_{name}_s']:.3f} s")
        for tier in tiers.values():
            tier.close()
    redis.close()
    report(results)
    if args.json:
        print(json.dumps({k: round(v, 4) for k, v in results.items()}))


def report(r: dict[str, float]) -> None:
    print(f"KV of {PROMPT_TOKENS} tokens ({PROMPT_TOKENS * 22.5 / 1024:.0f} MiB bf16) as "
          f"{PROMPT_TOKENS // CHUNK} chunks; memcpy {r['memcpy_gbps']:.2f} GB/s")
    print(f"{'tier':<6} {'put GB/s':>9} {'get GB/s':>9} {'TTFT s':>8} {'speedup':>8} target")
    print(f"{'none':<6} {'':>9} {'':>9} {r['ttft_none_s']:>8.3f} {'1.00x':>8}")
    for name in ("cpu", "ssd", "redis"):
        target = TARGETS.get(name)
        verdict = "" if target is None else (
            f">= {target:g}x " + ("met" if r[f"ttft_speedup_{name}"] >= target else "MISSED"))
        print(f"{name:<6} {r[f'{name}_put_gbps']:>9.2f} {r[f'{name}_get_gbps']:>9.2f} "
              f"{r[f'ttft_{name}_s']:>8.3f} {r[f'ttft_speedup_{name}']:>7.2f}x {verdict}")


if __name__ == "__main__":
    main()
