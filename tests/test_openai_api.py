"""The OpenAI-compatible HTTP API, driven by the official `openai` client against the session's
real cluster (1 prefill + 1 decode worker, fp32), and compared with the gRPC SDK and the
engine's own scores."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from tandem.client import Client
from tandem.cluster.auth import ApiKeys
from tandem.cluster.openai.app import build_app

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def api(server):
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def grpc_client(server):
    with Client(server.address, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def model(api) -> str:
    return api.models.list().data[0].id


def engine_logprobs(engine, ids: list[int]) -> torch.Tensor:
    """The engine's own teacher-forced log-softmax for every position of `ids` (fp32)."""
    return torch.log_softmax(engine.score(ids).float(), dim=-1)


def test_greedy_chat_equals_the_grpc_sdk(api, grpc_client, model):
    http = api.chat.completions.create(model=model, messages=CHAT, max_tokens=12,
                                       temperature=0)
    grpc = grpc_client.generate(messages=CHAT, max_tokens=12, temperature=0)
    assert http.choices[0].message.content == grpc.text
    assert http.choices[0].finish_reason == grpc.finish_reason
    assert http.usage.completion_tokens == grpc.usage.completion_tokens
    assert http.usage.prompt_tokens == grpc.usage.prompt_tokens


def test_chat_without_max_tokens_answers_until_eos(api, model):
    r = api.chat.completions.create(model=model, messages=CHAT, temperature=0)
    assert r.choices[0].finish_reason == "stop" and "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens > 0


def test_completion_without_max_tokens_gets_sixteen(api, model):
    r = api.completions.create(model=model, prompt=PROMPT, temperature=0, extra_body={
        "ignore_eos": True})
    assert r.usage.completion_tokens == 16


def test_greedy_completion_stream_equals_the_grpc_sdk(api, grpc_client, model):
    stream = api.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0,
                                    stream=True)
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text == grpc_client.generate(PROMPT, max_tokens=10, temperature=0).text


def test_async_client_with_token_id_prompt_equals_the_grpc_sdk(server, grpc_client, model):
    ids = grpc_client.tokenize(PROMPT)

    async def run():
        client = openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="x",
                                    max_retries=0)
        try:
            return await client.completions.create(model=model, prompt=ids, max_tokens=8,
                                                   temperature=0)
        finally:
            await client.close()

    http = asyncio.run(run())
    assert http.choices[0].text == grpc_client.generate(ids, max_tokens=8, temperature=0).text


def test_n_choices_differ_and_each_repeats_with_its_seed(api, model):
    def run():
        r = api.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=1.0,
                                   n=2, seed=11)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first, again = run(), run()
    assert first == again
    assert first[0] != first[1]
    # choice i samples with seed + i: choice 1 of seed 11 is choice 0 of seed 12
    single = api.completions.create(model=model, prompt=PROMPT, max_tokens=12,
                                    temperature=1.0, seed=12)
    assert single.choices[0].text == first[1]


def test_stop_string_cuts_exactly(api, model):
    full = api.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    cut = api.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                 stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_include_usage_sends_a_final_usage_chunk(api, model):
    chunks = list(api.chat.completions.create(
        model=model, messages=CHAT, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"


def test_a_repeated_prefix_reports_cached_tokens(api, model):
    prompt = " ".join(f"item{i}" for i in range(150)) + " and"  # > 256 tokens: a store chunk
    first = api.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 256
    for _ in range(10):  # the chunks are published to the store just after the first answer
        again = api.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
        if again.usage.prompt_tokens_details.cached_tokens:
            break
        time.sleep(0.5)
    assert again.usage.prompt_tokens_details.cached_tokens >= 256
    assert again.choices[0].text == first.choices[0].text


def test_chat_logprobs_equal_the_engines_own_scores(api, model, make_engine, grpc_client):
    r = api.chat.completions.create(model=model, messages=CHAT, max_tokens=6, temperature=0,
                                    logprobs=True, top_logprobs=3)
    grpc = grpc_client.generate(messages=CHAT, max_tokens=6, temperature=0, logprobs=3)
    prompt_len = grpc.usage.prompt_tokens
    engine = make_engine()
    chat_ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(CHAT),
                                       add_special_tokens=False)
    assert len(chat_ids) == prompt_len
    scores = engine_logprobs(engine, chat_ids + grpc.token_ids)
    for i, (entry, token) in enumerate(zip(r.choices[0].logprobs.content, grpc.token_ids,
                                           strict=True)):
        expected = scores[prompt_len - 1 + i]
        assert entry.logprob == pytest.approx(expected[token].item(), abs=1e-4)
        top = expected.topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            top.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == engine.tokenizer.decode(
            [top.indices[0].item()], skip_special_tokens=False)


def test_echo_with_logprobs_returns_the_prompts_logprobs(api, model, make_engine,
                                                          grpc_client):
    r = api.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0,
                               echo=True, logprobs=2)
    choice = r.choices[0]
    ids = grpc_client.tokenize(PROMPT)
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None
    scores = engine_logprobs(make_engine(), ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(scores[i - 1][ids[i]].item(), abs=1e-4)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(scores[i - 1].max().item(),
                                                                 abs=1e-4)


BAD_REQUESTS = [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "logprobs"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"min_tokens": 99, "max_tokens": 4}, "min_tokens"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"tempreture": 0.5}, "tempreture"),
    ({"max_tokens": 10**6}, "max_tokens"),
]


@pytest.mark.parametrize(("change", "param"), BAD_REQUESTS,
                         ids=[p for _, p in BAD_REQUESTS])
def test_bad_chat_request_is_400_naming_the_field(server, change, param):
    body = {"messages": CHAT, "max_tokens": 4} | change
    r = httpx.post(server.http_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split("[")[0] in error["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": [10**9]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"segments": ["a"], "echo": True}, "echo"),
], ids=["best_of", "suffix", "token-id", "missing-prompt", "logprobs", "segments-echo"])
def test_bad_completion_request_is_400_naming_the_field(server, body, param):
    r = httpx.post(server.http_url + "/v1/completions", json={"max_tokens": 2} | body,
                   timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_model_is_404_and_bad_json_is_400(server):
    r = httpx.post(server.http_url + "/v1/completions",
                   json={"model": "gpt-9", "prompt": "x"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(server.http_url + "/v1/completions", content=b"{not json", timeout=60)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_server_keeps_serving_after_bad_requests(api, model):
    for change, _ in BAD_REQUESTS[:4]:
        httpx.post(str(api.base_url) + "chat/completions", json={"messages": CHAT} | change)
    r = api.chat.completions.create(model=model, messages=CHAT, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_wrong_api_key_is_401_and_health_and_metrics_stay_open(server):
    app = build_app(server.server.frontend, ApiKeys(["right-key"]), server.server.metrics.registry,
                    [])
    with TestClient(app) as http:
        body = {"messages": CHAT, "max_tokens": 2}
        r = http.post("/v1/chat/completions", json=body,
                      headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert http.get("/v1/models").status_code == 401
        r = http.post("/v1/chat/completions", json=body,
                      headers={"Authorization": "Bearer right-key"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/metrics").status_code == 200


def test_request_id_header_is_honoured_and_echoed(server):
    r = httpx.post(server.http_url + "/v1/completions", timeout=60,
                   json={"prompt": "Hi", "max_tokens": 2}, headers={"X-Request-Id": "abc-123"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "abc-123" and r.json()["id"] == "cmpl-abc-123"


def test_tokenize_and_detokenize_round_trip(server, grpc_client):
    r = httpx.post(server.http_url + "/tokenize", json={"prompt": PROMPT}, timeout=60).json()
    assert r["tokens"] == grpc_client.tokenize(PROMPT) and r["count"] == len(r["tokens"])
    back = httpx.post(server.http_url + "/detokenize", json={"tokens": r["tokens"]},
                      timeout=60).json()
    assert back["prompt"].strip() == PROMPT


def test_client_disconnect_mid_stream_leaves_no_held_blocks(server):
    body = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, \
            http.stream("POST", server.http_url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"]
    server.wait_idle(timeout=60)


def test_each_stream_event_is_one_token_delta_then_done(server):
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 0}
    with httpx.Client(timeout=60) as http, \
            http.stream("POST", server.http_url + "/v1/completions", json=body) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    tokens = sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks)
    assert tokens == 5


def test_cors_allows_only_the_listed_origins(server):
    app = build_app(server.server.frontend, ApiKeys([]), server.server.metrics.registry,
                    ["https://ui.example"])
    preflight = {"Access-Control-Request-Method": "POST"}
    with TestClient(app) as http:
        r = http.options("/v1/chat/completions",
                         headers={"Origin": "https://ui.example", **preflight})
        assert r.headers["access-control-allow-origin"] == "https://ui.example"
        r = http.options("/v1/chat/completions",
                         headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in r.headers
