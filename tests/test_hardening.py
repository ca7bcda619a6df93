"""Hardening in the engine and the store: KV of other weights is never served, cache salts keep
requests apart, every input is bounded, a lying manifest is a miss, an abort stops planning."""

from __future__ import annotations

import json

import pytest
import torch

from tandem.engine.blend import BlendCancelled
from tandem.engine.blend_planner import BlendPlanner
from tandem.engine.chunk_cache import MemoryChunkCache
from tandem.engine.engine import LLMEngine
from tandem.engine.kv_cache import KVBlocks, KVSpec
from tandem.engine.llm import LLM
from tandem.engine.loader import load_model
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.segments import MAX_SEGMENTS, SegmentedPrompt
from tandem.kv_store.store import TieredStore
from tandem.kv_store.tiers.redis import MANIFEST, RedisTier
from tandem.kv_store.tiers.ssd import SsdTier

from .test_gpu_engine import build_model

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)


def test_weights_replaced_in_place_miss_the_kv_they_did_not_compute(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    model = build_model(tmp_path / "model", TINY, std=0.3)
    first = load_model(str(model), torch.float32, torch.device("cpu"))
    assert load_model(str(model), torch.float32, torch.device("cpu")).fingerprint \
        == first.fingerprint  # an unchanged checkpoint keeps its fingerprint (and its KV)
    spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_size=16)
    tokens = list(range(3, 40))
    kv = KVBlocks(spec, 16, torch.randn(2, 2, 1, 16, 2, 16))
    old = TieredStore([SsdTier(tmp_path / "ssd", 64 << 20)], first.fingerprint, spec,
                      chunk_tokens=16)
    old.put(old.prefix_keys(tokens)[0], kv)
    old.flush()
    old.close()
    # Same file names, same sizes, other weights.
    weights = next(model.glob("*.safetensors"))
    size = weights.stat().st_size
    build_model(model, TINY, std=0.31)
    assert next(model.glob("*.safetensors")).stat().st_size == size
    replaced = load_model(str(model), torch.float32, torch.device("cpu")).fingerprint
    assert replaced != first.fingerprint
    reopened = TieredStore([SsdTier(tmp_path / "ssd", 64 << 20)], replaced, spec,
                           chunk_tokens=16)
    assert reopened.load_prefix(tokens) is None
    reopened.close()
    again = TieredStore([SsdTier(tmp_path / "ssd", 64 << 20)], first.fingerprint, spec,
                        chunk_tokens=16)
    assert again.load_prefix(tokens) is not None  # the old weights' KV is still there for them
    again.close()


def test_requests_with_different_salts_share_no_prefix_blocks(loaded_fp32):
    llm = LLM.from_engine(_engine(loaded_fp32))
    prompt = list(range(100, 180))
    params = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}
    llm.generate(prompt, SamplingParams(**params, cache_salt="tenant-a"))
    hits = llm.engine.stats().num_prefix_hit_blocks
    other = llm.generate(prompt, SamplingParams(**params, cache_salt="tenant-b"))[0]
    assert other.num_cached_tokens == 0 and llm.engine.stats().num_prefix_hit_blocks == hits
    unsalted = llm.generate(prompt, SamplingParams(**params))[0]
    assert unsalted.num_cached_tokens == 0
    same = llm.generate(prompt, SamplingParams(**params, cache_salt="tenant-a"))[0]
    assert same.num_cached_tokens == 64  # whole blocks of the salted prefix


def test_store_keys_and_chunk_caches_are_namespaced_by_salt(loaded_fp32, tmp_path):
    engine = _engine(loaded_fp32)
    store = TieredStore([SsdTier(tmp_path, 64 << 20)], engine.fingerprint, engine.kv_spec,
                        chunk_tokens=16)
    tokens = list(range(40))
    assert store.prefix_keys(tokens, "a") != store.prefix_keys(tokens, "b") \
        != store.prefix_keys(tokens)
    cache = MemoryChunkCache(1 << 20)
    cache.salted("a").put([1, 2], torch.zeros(1, 2, 2, 1, 1))
    assert cache.salted("a").contains([1, 2])
    assert not cache.contains([1, 2]) and not cache.salted("b").contains([1, 2])


def test_sampling_inputs_are_bounded():
    with pytest.raises(ValueError, match="at most 16 strings"):
        SamplingParams(stop=[str(i) for i in range(17)])
    with pytest.raises(ValueError, match="at most 256 characters"):
        SamplingParams(stop=["x" * 257])
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt="")


def test_segmented_prompts_are_bounded():
    with pytest.raises(ValueError, match=f"at most {MAX_SEGMENTS}"):
        SegmentedPrompt([], [[1] * 8] * MAX_SEGMENTS, [1])
    with pytest.raises(ValueError, match=r"segments\[2\]: a chunk of 3 tokens"):
        SegmentedPrompt([], [[1] * 8, [1, 2, 3]], [1])


def test_an_abort_stops_planning_before_the_next_chunk(loaded_fp32):
    engine = _engine(loaded_fp32)
    planner = BlendPlanner(loaded_fp32.model, engine.kv_spec, MemoryChunkCache(1 << 30))
    asked: list[int] = []

    def cancelled() -> bool:
        asked.append(1)
        return len(asked) > 2  # aborted once two chunks were looked at

    prompt = SegmentedPrompt([1, 2, 3], [[7] * 16 for _ in range(6)], [9, 9])
    with pytest.raises(BlendCancelled, match="chunk 2"):
        planner.plan(prompt, cancelled=cancelled)


def test_a_redis_manifest_that_lies_about_its_parts_is_a_miss(redis_server):
    tier = RedisTier(redis_server.url, 64 << 20, part_bytes=1000)
    tier.put("tdkv:x", b"y" * 2500)
    assert bytes(tier.get("tdkv:x")) == b"y" * 2500
    for lie in ({"parts": 10**9, "size": 2500, "part": 1000},
                {"parts": 3, "size": 1 << 50, "part": 1000},
                {"parts": 1, "size": 2500, "part": 1 << 40}):
        tier.client.set("tdkv:x", MANIFEST + json.dumps(lie).encode())
        assert tier.get("tdkv:x") is None and tier.get_range("tdkv:x", 0, 10) is None
    tier.close()


def _engine(loaded) -> LLMEngine:
    from tandem.engine.config import EngineConfig

    return LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.05), loaded=loaded)


def test_a_broken_nixl_install_fails_the_nixl_tests_instead_of_skipping(monkeypatch):
    import importlib.util

    from tandem import transfer

    from .conftest import require_nixl

    monkeypatch.setattr(transfer, "nixl_problem", lambda: "NIXL is not usable here (OSError)")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    with pytest.raises(pytest.fail.Exception, match="installed but broken"):
        require_nixl()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(pytest.skip.Exception):
        require_nixl()


def test_the_codec_flag_says_it_does_not_apply_to_nixl():
    from tandem.cluster.server import codec_note

    assert "gRPC handoffs only" in codec_note("cachegen:1", [("nixl", "grpc")])
    assert codec_note("cachegen:1", [("grpc",)]) is None
    assert codec_note("raw", [("nixl", "grpc")]) is None
