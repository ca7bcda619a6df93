"""Attention offload's memory figure: how many requests one decode worker serves at once with
0, 1, 2 and 4 attention workers, each with the decode worker's own KV budget.

Each point is a real cluster (1 prefill, 1 decode, k attention workers; fp32, one torch thread
a worker, `BUDGET` blocks of 16 tokens a worker). Requests are 48-token prompts + 16 greedy
tokens (64 tokens of KV: 4 blocks). With no attention worker the decode worker holds the KV
(`--offload never`); with k it holds none (`--offload always`), so the pool's KV is k budgets.
At each point, `b` requests (the budget's worth) run at once: all must be admitted without
waiting for room (the router's capacity waits and the decode worker's preemptions do not move)
and finish with tokens identical to one engine's; then `b + 1` must make one wait or be
preempted, which shows `b` is the largest. The figure is
b x 64 tokens, with the mean inter-token time. On 2 cores this shows memory, not compute.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from tandem.client import Client
from tandem.cluster.config import ServeConfig
from tandem.cluster.server import TandemServer
from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.loader import load_model
from tandem.engine.sampling_params import SamplingParams

BUDGET = 16  # blocks of 16 tokens a worker: 4 requests of 64 tokens
PROMPT, NEW = 48, 16
POINTS = (0, 1, 2, 4)


class Running:
    """A TandemServer on its own event loop thread."""

    def __init__(self, config: ServeConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = TandemServer(config)
        self.address = self.run(self.server.start(), 600)

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.run(self.server.stop(), 120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def prompts(n: int, seed: int) -> list[list[int]]:
    return [[(seed * 7919 + i * 104729 + j * 31) % 40000 + 100 for j in range(PROMPT)]
            for i in range(n)]


NEAR_TIE = 1e-4  # a top-2 logit margin this small can flip under fp32 reordering


def reference_engine() -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", num_threads=2, kv_cache_gb=0.2),
                     loaded=load_model(None, torch.float32, torch.device("cpu")))


def divergences(e: LLMEngine, batch: list[list[int]], got: list[list[int]],
                want: list[list[int]]) -> list[dict]:
    """Where each stream left the reference, and the reference's top-2 logit margin there:
    mathematically exact reorderings (the LSE merge) round differently in the last bits of
    fp32, which decides only near-ties."""
    out = []
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g == w:
            continue
        at = next((j for j, (a, b) in enumerate(zip(g, w, strict=False)) if a != b),
                  min(len(g), len(w)))
        logits = e.score(batch[i] + w[:at])[-1]  # the last row predicts output token `at`
        top = torch.topk(logits, 2).values
        out.append({"request": i, "at_token": at, "reference_margin": float(top[0] - top[1])})
    return out


def reference(token_prompts: list[list[int]], e: LLMEngine) -> list[list[int]]:
    for i, p in enumerate(token_prompts):
        e.add_request(str(i), p, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))
    done = {}
    while e.has_unfinished_requests():
        done.update({int(o.request_id): o.token_ids for o in e.step() if o.finished})
    return [done[i] for i in range(len(token_prompts))]


def stream(address: str, tokens: list[int]) -> tuple[list[int], float]:
    """Its tokens, and its mean inter-token time."""
    got, stamps = [], []
    with Client(address, timeout=600) as client:
        for chunk in client.stream(tokens, max_tokens=NEW, temperature=0, ignore_eos=True):
            got.extend(chunk.token_ids)
            stamps.extend([time.perf_counter()] * len(chunk.token_ids))
            if chunk.finish_reason:
                break
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return got, sum(gaps) / max(len(gaps), 1)


def burst(running: Running, batch: list[list[int]]) -> tuple[list[list[int]], float, int]:
    """Run `batch` at once: the tokens, the mean inter-token time, and how often a request
    could not get room at once (waited for capacity, or was preempted on the decode
    worker)."""
    import ray

    router = running.server.router
    decode = running.server.decode_workers[0]
    before = router.num_capacity_waits + ray.get(decode.stats.remote()).engine.num_preemptions
    with ThreadPoolExecutor(len(batch)) as pool:
        results = list(pool.map(lambda p: stream(running.address, p), batch))
    after = router.num_capacity_waits + ray.get(decode.stats.remote()).engine.num_preemptions
    return [r[0] for r in results], statistics.mean(r[1] for r in results), after - before


def measure_capacity(log: Callable[[str], None]) -> dict:
    points = []
    ref = reference_engine()
    for k in POINTS:
        b = 4 * max(k, 1)
        batch = prompts(b + 1, 10 + k)
        want = reference(batch, ref)
        config = ServeConfig.model_validate({
            "attention_workers": k,
            "gateway": {"port": 0, "http_port": None},
            "worker": {"engine": {"dtype": "float32", "num_threads": 1, "kv_cache_gb": 0.1},
                       "kv_store": {"enabled": False},
                       "offload": {"mode": "always" if k else "never",
                                   "attention_kv_blocks": BUDGET, "decode_kv_blocks": BUDGET}}})
        log(f"capacity: starting a cluster with {k} attention workers")
        running = Running(config)
        try:
            got, itl, waits = burst(running, batch[:b])
            over_got, _, over_waits = burst(running, batch)
        finally:
            running.close()
        diverged = divergences(ref, batch[:b], got, want[:b]) + \
            divergences(ref, batch, over_got, want)
        point = {"attention_workers": k, "max_batch": b, "context": PROMPT + NEW,
                 "batch_x_context": b * (PROMPT + NEW), "itl_s": itl,
                 "identical": got == want[:b] and over_got == want, "diverged": diverged,
                 "only_near_ties": all(d["reference_margin"] < NEAR_TIE for d in diverged),
                 "waited_at_max": waits, "waited_at_max_plus_1": over_waits,
                 "is_largest": waits == 0 and over_waits > 0}
        log(f"capacity: {k} attention workers: batch {b} x {PROMPT + NEW} tokens at once "
            f"(waits {waits}; {b + 1} -> waits {over_waits}), ITL {itl * 1e3:.1f} ms, "
            f"identical {point['identical']}"
            + "".join(f"; request {d['request']} left at token {d['at_token']} (reference "
                      f"margin {d['reference_margin']:.1e})" for d in diverged))
        points.append(point)
    one = next(p for p in points if p["attention_workers"] == 1)
    four = next(p for p in points if p["attention_workers"] == 4)
    return {"points": points,
            "growth_1_to_4": four["batch_x_context"] / one["batch_x_context"]}
