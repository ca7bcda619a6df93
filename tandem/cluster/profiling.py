"""`tandem profile`: measure what one replica does on this machine, as a `ReplicaProfile`.

- prefill tok/s against prompt length (prefill-only requests, prefix caching off);
- decode step time against batch and context (greedy, EOS ignored: the time of n + 1 tokens
  less that of 1 token, over n steps);
- handoff bandwidth per KV transport, over real loopback connections (a request's KV of
  `HANDOFF_TOKENS` tokens, posted layer by layer, into another pool);
- the store: the time per token to load a cached chunk from the CPU tier (decode and checks
  included);
- the start-up time (loading the engine) and the KV capacity in tokens.
Each field's source says how it was measured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tandem.cluster.profile import DecodePoint, PrefillPoint, ReplicaProfile
from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.kv_cache import KVBlocks, KVCache
from tandem.engine.sampling_params import SamplingParams
from tandem.kv_store.codec import get_codec
from tandem.kv_store.kv_object import decode_object, encode_object
from tandem.kv_store.tiers.memory import MemoryTier
from tandem.transfer import TRANSPORTS, make_transport
from tandem.transfer.base import Handoff, KVIdentity, KVSink, KVTarget

HANDOFF_TOKENS = 1024
Report = Callable[[str], None]


def measure_profile(config: EngineConfig, prompt_lengths: list[int], batches: list[int],
                    contexts: list[int], decode_tokens: int = 8, repeats: int = 2,
                    report: Report = print) -> ReplicaProfile:
    torch.set_num_threads(config.num_threads or torch.get_num_threads())
    report("loading the engine")
    started = time.perf_counter()
    engine = LLMEngine(config.model_copy(update={"enable_prefix_caching": False}))
    startup_s = time.perf_counter() - started
    limit = engine.max_model_len - decode_tokens - 1
    prefill = []
    for length in sorted({min(n, limit) for n in prompt_lengths}):
        seconds = min(_prefill_s(engine, _prompt(length, salt)) for salt in range(repeats))
        prefill.append(PrefillPoint(prompt_tokens=length, tokens_per_s=length / seconds))
        report(f"prefill {length} tokens: {length / seconds:,.0f} tok/s")
    decode = []
    for context in sorted({min(c, limit) for c in contexts}):
        for batch in sorted(set(batches)):
            step = _decode_step_s(engine, batch, context, decode_tokens, repeats)
            decode.append(DecodePoint(batch=batch, context=context + decode_tokens // 2,
                                      step_s=step))
            report(f"decode batch {batch} at context {context}: {step * 1e3:.1f} ms a step")
    spec = engine.kv_spec
    bytes_per_token = _kv_bytes_per_token(engine)
    handoff = {name: bw for name in TRANSPORTS
               if (bw := _handoff_bytes_per_s(engine, name, report)) is not None}
    load_s = _store_load_s_per_token(engine)
    report(f"store: {load_s * 1e6:.2f} us per cached token from the CPU tier")
    stats = engine.stats()
    device = f"{'cuda' if torch.cuda.is_available() else 'cpu'}:{torch.get_num_threads()}"
    how = f"tandem profile on this machine ({device} threads, {config.dtype})"
    return ReplicaProfile(
        model=config.model or "SmolLM2-135M-Instruct", device=device, prefill=prefill,
        decode=decode, kv_capacity_tokens=stats.num_blocks * spec.block_size,
        handoff_bytes_per_s=handoff, kv_bytes_per_token=bytes_per_token,
        store_hit_load_s_per_token=load_s, startup_s=startup_s,
        layers=spec.num_layers,
        sources={field: f"measured: {how}" for field in (
            "prefill", "decode", "kv_capacity_tokens", "handoff_bytes_per_s",
            "store_hit_load_s_per_token", "startup_s")})


def write_profile(profile: ReplicaProfile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.model_dump_json(indent=1) + "\n")


def _prompt(length: int, salt: int) -> list[int]:
    return [1000 + (i * 104729 + salt * 7919) % 40000 for i in range(length)]


def _prefill_s(engine: LLMEngine, ids: list[int]) -> float:
    start = time.perf_counter()
    engine.add_request("profile", ids, SamplingParams(max_tokens=1, temperature=0),
                       prefill_only=True)
    while not engine.step():
        pass
    elapsed = time.perf_counter() - start
    engine.release("profile")
    return elapsed


def _run(engine: LLMEngine, prompts: list[list[int]], tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"profile-{i}", ids, params)
    open_ = set(range(len(prompts)))
    while open_:
        for out in engine.step():
            if out.finished:
                open_.discard(int(out.request_id.split("-")[1]))
    return time.perf_counter() - start


def _decode_step_s(engine: LLMEngine, batch: int, context: int, tokens: int,
                   repeats: int) -> float:
    prompts = [_prompt(context, salt) for salt in range(batch)]
    full = min(_run(engine, prompts, tokens + 1) for _ in range(repeats))
    first = min(_run(engine, prompts, 1) for _ in range(repeats))
    return max(full - first, 1e-6) / tokens


def _kv_bytes_per_token(engine: LLMEngine) -> int:
    spec = engine.kv_spec
    element = torch.empty(0, dtype=getattr(torch, spec.dtype)).element_size()
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * element


class _Sink(KVSink):
    def __init__(self, blocks: list[int]) -> None:
        self.blocks = blocks

    def blocks_of(self, request_id: str) -> list[int] | None:
        return self.blocks

    async def complete(self, handoff: Handoff, num_tokens: int) -> None:
        return None


def _handoff_bytes_per_s(engine: LLMEngine, name: str, report: Report) -> float | None:
    spec = engine.kv_spec
    n = spec.num_blocks_for(HANDOFF_TOKENS)
    src, dst = KVCache(spec, n, torch.device("cpu")), KVCache(spec, n, torch.device("cpu"))
    src.data.copy_(torch.randn(src.data.shape).to(src.data.dtype))
    blocks = list(range(n))
    identity = KVIdentity(engine.fingerprint, spec, max_tokens=HANDOFF_TOKENS)

    async def once(i: int) -> float:
        receiving, sending = make_transport(name), make_transport(name)
        try:
            info = await receiving.start_receiver("127.0.0.1", identity, dst, _Sink(blocks))
            receiving.admit(sending.introduction())
            start = time.perf_counter()
            session = sending.open_session(
                src, engine.fingerprint, KVTarget(info, tuple(blocks), HANDOFF_TOKENS), f"p{i}")
            for layer in range(spec.num_layers):
                session.post(range(layer, layer + 1), 0, blocks)
            await session.finish(Handoff(f"p{i}", [0]), timeout=60)
            return time.perf_counter() - start
        finally:
            await sending.close()
            await receiving.close()

    try:
        seconds = min(asyncio.run(once(i)) for i in range(3))
    except Exception as e:  # a transport this machine lacks (e.g. NIXL without UCX)
        report(f"handoff over {name}: not measured ({e!r})")
        return None
    bandwidth = src.data.numel() * src.data.element_size() / seconds
    report(f"handoff over {name}: {bandwidth / 1e9:.2f} GB/s")
    return bandwidth


def _store_load_s_per_token(engine: LLMEngine, tokens: int = 256) -> float:
    spec = engine.kv_spec
    n = spec.num_blocks_for(tokens)
    cache = KVCache(spec, n, torch.device("cpu"))
    data = torch.randn(cache.data.shape).to(cache.data.dtype)
    kv = KVBlocks(spec, tokens, data.contiguous())
    tier = MemoryTier("cpu", 1 << 30)
    tier.put("chunk", encode_object(kv, engine.fingerprint, get_codec("raw")))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        decode_object(tier.get("chunk"), engine.fingerprint, spec)
        best = min(best, time.perf_counter() - start)
    return best / tokens
