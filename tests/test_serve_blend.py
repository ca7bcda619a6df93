"""Chunk-cache reuse through the cluster (real Ray workers, the gRPC SDK, the prefill worker's
tiered store): with the default policy (Cache-Craft) the same greedy output as `LLM` replaying
the same requests, chunk caches and variants reused in another order after another prefix,
usage counts, ratio 1 and blend=False equal to full prefill."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from tandem.client import Client, TandemError
from tandem.proto.v1 import tandem_pb2 as pb
from tandem.proto.v1 import tandem_pb2_grpc as pb_grpc

from .conftest import greedy

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
PARAGRAPHS = [p for p in (Path(__file__).parents[1] / "bench" / "data" / "harbour.txt")
              .read_text().split("\n") if len(p) > 300]
QUESTION = "Question: What did the keeper write in the ledger?\nAnswer:"


def fresh_llm(loaded_fp32):
    """Blending in one engine, as the worker's: fp32, one thread, a chunk cache of its own."""
    from tandem.engine.chunk_cache import MemoryChunkCache
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import LLMEngine
    from tandem.engine.llm import LLM

    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.2, num_threads=1,
                                    enable_prefix_caching=False), loaded=loaded_fp32)
    return LLM.from_engine(engine, MemoryChunkCache(1 << 30))


@pytest.fixture(scope="module")
def reference(loaded_fp32):
    return fresh_llm(loaded_fp32)


def ask(server, segments: list[str], **options):
    with Client(server.address, timeout=300) as client:
        return client.generate(segments=segments, max_tokens=MAX_TOKENS, temperature=0,
                               ignore_eos=True, **options)


def local(llm, segments: list[str], **options):
    params = replace(greedy(MAX_TOKENS), cache_salt=options.pop("cache_salt", None))
    return llm.generate({"segments": segments, **options}, params)[0]


def chunk_tokens(llm, segments: list[str]) -> int:
    """Tokens in the chunks (the segments between the prefix and the question)."""
    return sum(len(llm.tokenizer.encode(s, add_special_tokens=False)) for s in segments[1:-1])


def stored(server) -> None:
    """Wait until the prefill worker's store has written everything queued (variants are
    written in the background)."""
    server.wait_until(lambda stats: all(s.kv_store.pending_writes == 0 for s in stats
                                        if s.kv_store is not None))


def test_the_default_policy_through_the_cluster_equals_llm_replaying_the_same_requests(
        server, loaded_fp32):
    """The same request sequence on fresh caches (a salt of its own on the cluster): a cold
    prompt (prefilled in full, its variants kept), the chunks in another order after another
    prefix (one from a variant, two computed on their own), then the first prompt again
    (every chunk from a cache)."""
    llm = fresh_llm(loaded_fp32)
    salt = f"craft-{uuid.uuid4().hex}"
    sequence = [["You read old ledgers.", *PARAGRAPHS[:3], QUESTION],
                ["Some other prefix.", PARAGRAPHS[2], PARAGRAPHS[0], PARAGRAPHS[1], QUESTION],
                ["You read old ledgers.", *PARAGRAPHS[:3], QUESTION]]
    usages = []
    for segments in sequence:
        got = ask(server, segments, cache_salt=salt)
        stored(server)
        want = local(llm, segments, cache_salt=salt)
        assert got.token_ids == want.token_ids
        assert got.usage.recomputed_tokens == want.num_recomputed_tokens
        usages.append((got.usage.cached_tokens, got.usage.recomputed_tokens))
    n = chunk_tokens(llm, sequence[0])
    assert usages[0] == (0, n)  # cold: every chunk computed
    assert 0 < usages[1][0] < n and 0 < usages[1][1] < n  # blended, one chunk from a variant
    assert usages[2][0] >= n  # every chunk from a cache (prefix chunks maybe too)


def test_full_recompute_and_no_blend_through_the_cluster_equal_full_prefill(server, reference):
    segments = ["You read old ledgers.", *PARAGRAPHS[6:8], QUESTION]
    plain = reference.generate(
        [reference.tokenizer.encode(segments[0]) + [
            t for s in segments[1:] for t in reference.tokenizer.encode(
                s, add_special_tokens=False)]], greedy(MAX_TOKENS))[0].token_ids
    full = ask(server, segments, recompute_ratio=1.0)
    assert full.token_ids == plain
    assert full.usage.recomputed_tokens == chunk_tokens(reference, segments)
    again = ask(server, segments, recompute_ratio=1.0)  # its chunks cached now: blended
    assert again.token_ids == plain
    ordinary = ask(server, segments, blend=False)
    assert ordinary.token_ids == plain
    assert ordinary.usage.recomputed_tokens == 0


def test_bad_segments_are_refused_with_the_field_named(server):
    with pytest.raises(TandemError, match="question") as refused:
        ask(server, ["prefix", "a chunk long enough to be cached and blended on its own", ""])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The SDK checks the ratio itself: send the bad value with the raw stub.
    with grpc.insecure_channel(server.address) as channel, \
            pytest.raises(grpc.RpcError) as error:
        list(pb_grpc.TandemStub(channel).Generate(pb.GenerateRequest(
            segments=pb.Segments(texts=["", "chunk", "question"], recompute_ratio=1.5)),
            timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "recompute_ratio" in error.value.details()
