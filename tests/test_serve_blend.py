"""CacheBlend through the cluster (real Ray workers, the gRPC SDK, the prefill worker's tiered
store): the same greedy output as blending in one engine, chunk caches reused in another order
after another prefix, usage counts, ratio 1 and blend=False equal to full prefill."""

from __future__ import annotations

import time
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


@pytest.fixture(scope="module")
def reference(loaded_fp32):
    """Blending in one engine, as the worker's: fp32, one thread, its own chunk cache."""
    from tandem.engine.chunk_cache import MemoryChunkCache
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import LLMEngine
    from tandem.engine.llm import LLM

    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.2, num_threads=1,
                                    enable_prefix_caching=False), loaded=loaded_fp32)
    return LLM.from_engine(engine, MemoryChunkCache(1 << 30))


def ask(server, segments: list[str], **options):
    with Client(server.address, timeout=300) as client:
        return client.generate(segments=segments, max_tokens=MAX_TOKENS, temperature=0,
                               ignore_eos=True, **options)


def local(llm, segments: list[str], **options):
    return llm.generate({"segments": segments, **options}, greedy(MAX_TOKENS))[0]


def chunk_tokens(llm, segments: list[str]) -> int:
    """Tokens in the chunks (the segments between the prefix and the question)."""
    return sum(len(llm.tokenizer.encode(s, add_special_tokens=False)) for s in segments[1:-1])


def ask_until_cached(server, segments: list[str], cached: int):
    """The chunks are written to the store in the background: ask until the write landed."""
    deadline = time.monotonic() + 30
    while True:
        completion = ask(server, segments)
        if completion.usage.cached_tokens >= cached or time.monotonic() > deadline:
            return completion
        time.sleep(0.2)


def test_blending_through_the_cluster_equals_blending_in_one_engine(server, reference):
    segments = ["You read old ledgers.", *PARAGRAPHS[:3], QUESTION]
    n = chunk_tokens(reference, segments)
    first = ask(server, segments)
    want = local(reference, segments)
    assert first.token_ids == want.token_ids
    assert first.usage.recomputed_tokens == want.num_recomputed_tokens == round(0.15 * n)
    again = ask_until_cached(server, segments, n)
    assert again.usage.cached_tokens == n  # every chunk from the store (the prefix is short)
    assert again.token_ids == local(reference, segments).token_ids == want.token_ids


def test_a_chunk_in_another_order_after_another_prefix_is_a_store_hit(server, reference):
    first = ["A first prefix.", *PARAGRAPHS[3:6], QUESTION]
    ask_until_cached(server, first, chunk_tokens(reference, first))
    segments = ["Some other prefix, longer than the first one.", PARAGRAPHS[5], PARAGRAPHS[3],
                PARAGRAPHS[4], QUESTION]
    got = ask(server, segments)
    assert got.usage.cached_tokens == chunk_tokens(reference, segments)
    assert got.token_ids == local(reference, segments).token_ids


def test_full_recompute_and_no_blend_through_the_cluster_equal_full_prefill(server, reference):
    segments = ["You read old ledgers.", *PARAGRAPHS[6:8], QUESTION]
    plain = reference.generate(
        [reference.tokenizer.encode(segments[0]) + [
            t for s in segments[1:] for t in reference.tokenizer.encode(
                s, add_special_tokens=False)]], greedy(MAX_TOKENS))[0].token_ids
    full = ask(server, segments, recompute_ratio=1.0)
    assert full.token_ids == plain
    assert full.usage.recomputed_tokens == chunk_tokens(reference, segments)
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
