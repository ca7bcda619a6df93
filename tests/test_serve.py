"""End to end on a real cluster: SDK -> gateway -> prefill worker -> gRPC KV handoff ->
decode worker, all real processes (Ray actors) and real gRPC on loopback."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from tandem.client import AsyncClient, Client, TandemError
from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.llm import LLM
from tandem.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

TEXTS = [
    "The river ran past the old mill and into the valley, where",
    "List three prime numbers:",
    "Q: What is the boiling point of water?\nA:",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker who repaired every clock in the region. One winter morning",
]
N = 10


@pytest.fixture(scope="module")
def llm(loaded_fp32) -> LLM:
    """The single-engine reference: the same weights, dtype and greedy decoding."""
    return LLM.from_engine(LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1),
                                     loaded=loaded_fp32))


@pytest.fixture(scope="module")
def reference(llm) -> dict[str, tuple[list[int], str]]:
    outs = llm.generate(TEXTS, SamplingParams(max_tokens=N, temperature=0, ignore_eos=True))
    return {t: (o.token_ids, o.text) for t, o in zip(TEXTS, outs, strict=True)}


def greedy(**kw):
    return {"max_tokens": N, "temperature": 0, "ignore_eos": True} | kw


def test_generate_matches_single_engine_output(server, reference):
    with Client(server.address, timeout=120) as client:
        for text, (ids, out_text) in reference.items():
            out = client.generate(text, **greedy())
            assert out.token_ids == ids
            assert out.text == out_text
            assert out.finish_reason == "length"
            assert out.usage.completion_tokens == N
            assert out.usage.prompt_tokens == len(client.tokenize(text))
            assert 0 < out.ttft_s <= out.timings.total_s
            assert out.timings.prefill_s > 0 and out.timings.handoff_s > 0


def test_stream_concatenates_to_single_engine_output(server, reference):
    with Client(server.address, timeout=120) as client:
        for text, (ids, out_text) in reference.items():
            chunks = list(client.stream(text, **greedy()))
            assert [t for c in chunks for t in c.token_ids] == ids
            assert "".join(c.text for c in chunks) == out_text
            assert chunks[-1].finish_reason == "length"
            assert all(c.finish_reason is None for c in chunks[:-1])
            assert len(chunks) > 1  # tokens arrive as they are decoded, not all at the end


def test_async_client_matches_single_engine_output(server, reference):
    async def main():
        async with AsyncClient(server.address, timeout=120) as client:
            text, (ids, out_text) = next(iter(reference.items()))
            out = await client.generate(text, **greedy())
            chunks = [c async for c in client.stream(text, **greedy())]
            return out, chunks, ids, out_text

    out, chunks, ids, out_text = asyncio.run(main())
    assert out.token_ids == ids and out.text == out_text
    assert [t for c in chunks for t in c.token_ids] == ids


def test_chat_messages_match_llm_chat(server, llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = llm.chat(messages, SamplingParams(max_tokens=N, temperature=0))[0]
    with Client(server.address, timeout=120) as client:
        out = client.generate(messages=messages, max_tokens=N, temperature=0)
    assert out.token_ids == want.token_ids and out.text == want.text


def test_sixteen_concurrent_streams_complete_correctly(server, reference):
    texts = [TEXTS[i % len(TEXTS)] for i in range(16)]

    async def one(client, text):
        chunks = [c async for c in client.stream(text, **greedy())]
        return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)

    async def main():
        async with AsyncClient(server.address, timeout=300) as client:
            return await asyncio.gather(*(one(client, t) for t in texts))

    results = asyncio.run(main())
    for text, result in zip(texts, results, strict=True):
        assert result == reference[text]
    server.wait_idle()


def test_abort_ends_the_stream_and_frees_blocks_on_both_workers(server):
    with Client(server.address, timeout=120) as client:
        stream = client.stream(TEXTS[0], request_id="abort-me", **greedy(max_tokens=500))
        first = next(stream)
        assert first.request_id == "abort-me"
        assert client.abort("abort-me") is True
        last = list(stream)[-1]
        assert last.finish_reason == "abort"
        assert client.abort("abort-me") is False
    server.wait_idle()


def test_client_disconnect_frees_blocks_on_both_workers(server):
    client = Client(server.address, timeout=120)
    stream = client.stream(TEXTS[1], **greedy(max_tokens=500))
    next(stream)
    server.wait_until(lambda stats: any(s.engine.num_running for s in stats))
    client.close()  # the connection goes away mid-stream
    server.wait_idle()


def test_deadline_shorter_than_generation_is_deadline_exceeded(server):
    with Client(server.address) as client, pytest.raises(TandemError) as err:
        client.generate(TEXTS[2], **greedy(max_tokens=500), timeout=1.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    server.wait_idle()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1] * 9000}, "prompt"),
    ({"prompt": [10**6]}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"model": "no-such-model"}, "model"),
    ({"messages": [{"role": "wizard", "content": "hi"}], "prompt": None}, "role"),
])
def test_bad_input_is_invalid_argument_naming_the_field(server, kwargs, field):
    args = {"prompt": "Hello"} | kwargs
    prompt = args.pop("prompt")
    with Client(server.address, timeout=60) as client:
        with pytest.raises(TandemError) as err:
            client.generate(prompt, **args)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()
        assert client.generate("Hello", max_tokens=2).finish_reason in ("length", "stop")


def test_tokenize_list_models_and_health(server, llm):
    with Client(server.address, timeout=60) as client:
        assert client.health() is True
        assert client.tokenize("Hello world") == llm.tokenizer.encode("Hello world")
        (model,) = client.list_models()
        assert model.id == "smollm2-135m-instruct" and model.max_model_len > 0
        with pytest.raises(TandemError) as err:
            client.tokenize("")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_gateway_serves_reflection_and_health(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="tandem.v1.Tandem"), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"tandem.v1.Tandem", "grpc.health.v1.Health"} <= names


def test_request_id_can_be_reused_right_after_a_deadline(server, reference):
    text, (ids, _) = next(iter(reference.items()))
    with Client(server.address, timeout=120) as client:
        with pytest.raises(TandemError) as err:
            client.generate(text, request_id="again", **greedy(max_tokens=500), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        out = client.generate(text, request_id="again", **greedy())
    assert out.token_ids == ids and out.finish_reason == "length"
    server.wait_idle()
