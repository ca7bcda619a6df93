"""The client SDK without a gateway: request building, retry config, errors, and a tiny server."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tandem.client import AsyncClient, Chunk, Client, Completion, TandemError, Timings, Usage
from tandem.client._request import build_generate_request, channel_options, service_config
from tandem.proto.v1 import tandem_pb2 as pb
from tandem.proto.v1 import tandem_pb2_grpc as pb_grpc

DEFAULTS = {"recompute_ratio": None, "blend": None, "max_tokens": None, "temperature": 1.0,
            "top_p": 1.0, "top_k": 0, "seed": None, "stop": None, "request_id": None,
            "model": None, "ignore_eos": False}
ONE_INPUT = "exactly one of `prompt`, `messages` or `segments` must be given"


def build(prompt=None, messages=None, segments=None, **overrides) -> pb.GenerateRequest:
    return build_generate_request(prompt, messages=messages, segments=segments,
                                  **{**DEFAULTS, **overrides})


# --- building requests -------------------------------------------------------------------------

def test_str_prompt_becomes_text_and_sampling_fields_are_sent_explicitly():
    req = build("Hello", max_tokens=5, temperature=0.0, seed=7, model="m", request_id="r1")
    assert req.WhichOneof("input") == "text"
    assert req.text == "Hello"
    assert (req.model, req.request_id) == ("m", "r1")
    for field in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        assert req.sampling.HasField(field), field
    assert (req.sampling.max_tokens, req.sampling.temperature, req.sampling.seed) == (5, 0.0, 7)
    assert (req.sampling.top_p, req.sampling.top_k) == (1.0, 0)


def test_seed_is_left_unset_when_not_given():
    assert not build("x").sampling.HasField("seed")


def test_token_id_prompt_becomes_token_ids():
    req = build([1, 2, 3])
    assert req.WhichOneof("input") == "token_ids"
    assert list(req.token_ids.ids) == [1, 2, 3]


def test_messages_become_chat_messages():
    req = build(messages=[{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi"}])
    assert req.WhichOneof("input") == "messages"
    assert [(m.role, m.content) for m in req.messages.messages] == [
        ("system", "Be brief."), ("user", "Hi")]


def test_message_without_content_is_rejected():
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        build(messages=[{"role": "user"}])


@pytest.mark.parametrize("prompt", [[1, "2"], 3.5, [True]])
def test_prompt_of_the_wrong_type_is_rejected(prompt):
    with pytest.raises(TypeError, match="prompt"):
        build(prompt)


@pytest.mark.parametrize(("prompt", "messages", "segments"), [
    (None, None, None),
    ("hi", [{"role": "user", "content": "hi"}], None),
    ("hi", None, ["", "hi"]),
    (None, [], ["", "hi"]),
])
def test_exactly_one_of_prompt_messages_and_segments_is_required(prompt, messages, segments):
    with pytest.raises(ValueError, match=ONE_INPUT):
        build(prompt, messages, segments)


def test_segments_become_segments_with_options_left_to_the_server():
    req = build(segments=["", "Passage one.", "Passage two.", "Question?"])
    assert req.WhichOneof("input") == "segments"
    assert list(req.segments.texts) == ["", "Passage one.", "Passage two.", "Question?"]
    assert not req.segments.HasField("recompute_ratio")
    assert not req.segments.HasField("blend")


@pytest.mark.parametrize(("ratio", "blend"), [(0.0, False), (0.5, True), (1, True)])
def test_segment_options_are_sent_when_given(ratio, blend):
    req = build(segments=("Prefix.", "Chunk.", "Question?"), recompute_ratio=ratio, blend=blend)
    assert req.segments.HasField("recompute_ratio") and req.segments.HasField("blend")
    assert (req.segments.recompute_ratio, req.segments.blend) == (ratio, blend)


@pytest.mark.parametrize("options", [{"recompute_ratio": 0.2}, {"blend": False}])
def test_segment_options_without_segments_are_rejected(options):
    with pytest.raises(ValueError, match="only to `segments`"):
        build("hi", **options)


@pytest.mark.parametrize("ratio", [-0.01, 1.5, float("nan"), float("inf")])
def test_recompute_ratio_outside_zero_to_one_is_rejected(ratio):
    with pytest.raises(ValueError, match=r"recompute_ratio=.* must be in \[0, 1\]"):
        build(segments=["", "q"], recompute_ratio=ratio)


@pytest.mark.parametrize("segments", [[], ["only a question"]])
def test_segments_need_a_prefix_and_a_question(segments):
    with pytest.raises(ValueError, match="at least a prefix"):
        build(segments=segments)


@pytest.mark.parametrize("segments", ["prefix and question", ["", 3], [b"", b"q"]])
def test_segments_of_the_wrong_type_are_rejected(segments):
    with pytest.raises(TypeError, match="segments must be a list of str"):
        build(segments=segments)


@pytest.mark.parametrize(("options", "match"), [
    ({"recompute_ratio": "0.2"}, "recompute_ratio"), ({"recompute_ratio": True}, "recompute_ratio"),
    ({"blend": 1}, "blend"),
])
def test_segment_options_of_the_wrong_type_are_rejected(options, match):
    with pytest.raises(TypeError, match=match):
        build(segments=["", "q"], **options)


def test_generate_and_stream_validate_before_any_rpc():
    with Client("127.0.0.1:1") as client:
        with pytest.raises(ValueError, match=ONE_INPUT):
            client.generate()
        with pytest.raises(ValueError, match=ONE_INPUT):
            client.stream("a", messages=[])
        with pytest.raises(ValueError, match="recompute_ratio"):
            client.generate(segments=["", "q"], recompute_ratio=2.0)
        with pytest.raises(ValueError, match="only to `segments`"):
            client.stream("a", blend=False)


@pytest.mark.parametrize(("stop", "want"), [
    (None, []), ("\n", ["\n"]), (["a", "bc"], ["a", "bc"]),
])
def test_stop_accepts_a_str_or_a_list(stop, want):
    assert list(build("x", stop=stop).sampling.stop) == want


# --- channel options ---------------------------------------------------------------------------

def test_service_config_retries_idempotent_methods_on_unavailable_but_not_generate():
    options = dict(channel_options(max_retries=3))
    assert options["grpc.enable_retries"] == 1
    config = json.loads(options["grpc.service_config"])
    [method_config] = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    assert names == {("tandem.v1.Tandem", "Tokenize"), ("tandem.v1.Tandem", "ListModels"),
                     ("tandem.v1.Tandem", "Abort"), ("grpc.health.v1.Health", "Check")}
    assert "Generate" not in options["grpc.service_config"]
    assert method_config["retryPolicy"] == {
        "maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s",
        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}


def test_max_attempts_is_capped_at_five_and_zero_retries_disables_the_policy():
    policy = service_config(10)["methodConfig"][0]["retryPolicy"]
    assert policy["maxAttempts"] == 5
    assert service_config(0) == {}
    with pytest.raises(ValueError, match="max_retries"):
        service_config(-1)


def test_root_certificates_without_tls_is_rejected():
    with pytest.raises(ValueError, match="tls=True"):
        Client("127.0.0.1:1", root_certificates=b"pem")


# --- errors ------------------------------------------------------------------------------------

def test_tandem_error_wraps_code_and_details():
    err = TandemError(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens=0 must be an integer > 0")
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == str(err) == "max_tokens=0 must be an integer > 0"
    assert "INVALID_ARGUMENT" in repr(err)


def test_tandem_error_from_an_rpc_error_keeps_its_status():
    class Failed(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "connection refused"

    err = TandemError.from_rpc_error(Failed())
    assert (err.code(), str(err)) == (grpc.StatusCode.UNAVAILABLE, "connection refused")


# --- import weight ------------------------------------------------------------------------------

def test_importing_the_client_pulls_in_no_heavy_dependencies():
    code = ("import tandem.client, sys; assert 'torch' not in sys.modules and "
            "'ray' not in sys.modules and 'numpy' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr


# --- against a tiny in-process server ----------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_health_is_false_when_nothing_listens():
    start = time.monotonic()
    with Client(f"127.0.0.1:{free_port()}") as client:
        assert client.health() is False
    assert time.monotonic() - start < 3


class TinyTandem(pb_grpc.TandemServicer):
    """Streams "Hel" + "lo"; request ids "cut", "abort" and "slow" misbehave on purpose."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []

    def Generate(self, request, context):
        self.requests.append(request)
        rid = request.request_id or "gen-1"
        if rid == "slow":
            while context.is_active():
                time.sleep(0.01)
            return
        yield pb.GenerateResponse(request_id=rid, text="Hel", token_ids=[1, 2])
        if rid == "abort":
            context.abort(grpc.StatusCode.CANCELLED, "request aborted")
        if rid == "cut":
            return
        yield pb.GenerateResponse(
            request_id=rid, text="lo", token_ids=[3], finish_reason="length",
            usage=pb.Usage(prompt_tokens=4, completion_tokens=3, cached_tokens=2,
                           recomputed_tokens=1),
            timings=pb.Timings(ttft_s=0.25, total_s=0.5, prefill_s=0.125, handoff_s=0.0625,
                               queue_s=0.03125))

    def Tokenize(self, request, context):
        if not request.text:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text: is empty")
        return pb.TokenizeResponse(token_ids=[ord(c) for c in request.text])


WANT_USAGE = Usage(prompt_tokens=4, completion_tokens=3, cached_tokens=2, recomputed_tokens=1)
WANT_TIMINGS = Timings(ttft_s=0.25, total_s=0.5, prefill_s=0.125, handoff_s=0.0625,
                       queue_s=0.03125)
WANT_COMPLETION = Completion(text="Hello", token_ids=[1, 2, 3], finish_reason="length",
                             request_id="gen-1", usage=WANT_USAGE, timings=WANT_TIMINGS)
WANT_CHUNKS = [
    Chunk(text="Hel", token_ids=[1, 2], request_id="gen-1"),
    Chunk(text="lo", token_ids=[3], request_id="gen-1", finish_reason="length",
          usage=WANT_USAGE, timings=WANT_TIMINGS),
]


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[tuple[str, TinyTandem, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    servicer = TinyTandem()
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    pb_grpc.add_TandemServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer, health_servicer
    server.stop(grace=None)


def test_generate_accumulates_the_stream_with_server_usage_and_timings(tiny_server):
    address, servicer, _ = tiny_server
    with Client(address) as client:
        out = client.generate("Hi", max_tokens=3, temperature=0.0, stop=["\n"])
    assert out == WANT_COMPLETION
    assert out.ttft_s == 0.25
    sent = servicer.requests[-1]
    assert (sent.text, sent.sampling.max_tokens, list(sent.sampling.stop)) == ("Hi", 3, ["\n"])
    assert sent.sampling.HasField("temperature")


def test_generate_sends_segments_and_reports_recomputed_tokens(tiny_server):
    address, servicer, _ = tiny_server
    with Client(address) as client:
        out = client.generate(segments=["", "A passage.", "Question?"], recompute_ratio=0.25)
    assert out.usage.recomputed_tokens == 1
    sent = servicer.requests[-1].segments
    assert list(sent.texts) == ["", "A passage.", "Question?"]
    assert sent.recompute_ratio == 0.25 and not sent.HasField("blend")


def test_stream_yields_new_tokens_and_only_the_last_chunk_is_final(tiny_server):
    with Client(tiny_server[0]) as client:
        assert list(client.stream([5, 6])) == WANT_CHUNKS


def test_stream_aborted_by_the_server_raises_tandem_error(tiny_server):
    with Client(tiny_server[0]) as client:
        chunks = client.stream("x", request_id="abort")
        assert next(chunks).text == "Hel"
        with pytest.raises(TandemError) as err:
            next(chunks)
    assert err.value.code() is grpc.StatusCode.CANCELLED
    assert str(err.value) == "request aborted"


def test_stream_ending_without_finish_reason_is_an_internal_error(tiny_server):
    with Client(tiny_server[0]) as client, pytest.raises(TandemError) as err:
        client.generate("x", request_id="cut")
    assert err.value.code() is grpc.StatusCode.INTERNAL
    assert str(err.value) == "stream ended without a finish_reason"


def test_client_default_timeout_surfaces_as_deadline_exceeded(tiny_server):
    with Client(tiny_server[0], timeout=0.2) as client, pytest.raises(TandemError) as err:
        client.generate("x", request_id="slow")
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_tokenize_returns_ids_and_server_errors_keep_their_message(tiny_server):
    with Client(tiny_server[0]) as client:
        assert client.tokenize("ab") == [97, 98]
        with pytest.raises(TandemError) as err:
            client.tokenize("")
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert str(err.value) == err.value.details() == "text: is empty"


def test_unimplemented_methods_raise_tandem_error(tiny_server):
    with Client(tiny_server[0]) as client, pytest.raises(TandemError) as err:
        client.list_models()
    assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_health_follows_the_servers_serving_status(tiny_server):
    address, _, health_servicer = tiny_server
    with Client(address) as client:
        assert client.health() is True
        health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            assert client.health() is False
        finally:
            health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)


def test_async_client_generates_streams_and_tokenizes(tiny_server):
    async def main() -> None:
        async with AsyncClient(tiny_server[0]) as client:
            assert await client.generate(messages=[{"role": "user", "content": "Hi"}]) == (
                WANT_COMPLETION)
            assert [c async for c in client.stream("Hi")] == WANT_CHUNKS
            out = await client.generate(segments=["P", "C", "Q"], blend=False)
            assert out.usage.recomputed_tokens == 1
            assert tiny_server[1].requests[-1].segments.blend is False
            assert await client.tokenize("ab") == [97, 98]
            with pytest.raises(TandemError, match="text: is empty") as err:
                await client.tokenize("")
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert await client.health() is True

    asyncio.run(main())


def test_async_client_raises_tandem_error_mid_stream_and_on_deadline(tiny_server):
    async def main() -> None:
        async with AsyncClient(tiny_server[0]) as client:
            with pytest.raises(TandemError) as aborted:
                async for _ in client.stream("x", request_id="abort"):
                    pass
            assert aborted.value.code() is grpc.StatusCode.CANCELLED
            with pytest.raises(TandemError) as cut:
                await client.generate("x", request_id="cut")
            assert cut.value.code() is grpc.StatusCode.INTERNAL
            with pytest.raises(TandemError) as late:
                await client.generate("x", request_id="slow", timeout=0.2)
            assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(ValueError, match=ONE_INPUT):
                client.stream()

    asyncio.run(main())


def test_async_health_is_false_when_nothing_listens():
    async def main() -> bool:
        async with AsyncClient(f"127.0.0.1:{free_port()}") as client:
            return await client.health()

    assert asyncio.run(main()) is False


def test_max_tokens_is_left_to_the_server_when_not_given():
    assert not build("x").sampling.HasField("max_tokens")


def test_api_key_travels_as_a_bearer_token_and_cache_salt_as_an_option():
    from tandem.client._request import call_metadata

    assert call_metadata("k1") == (("authorization", "Bearer k1"),)
    assert call_metadata(None) == ()
    with pytest.raises(ValueError, match="api_key"):
        call_metadata("two words")
    assert build("x", cache_salt="tenant").sampling.cache_salt == "tenant"
    assert not build("x").sampling.HasField("cache_salt")


def test_client_certificates_need_tls_and_come_in_pairs():
    from tandem.client._request import channel_credentials

    with pytest.raises(ValueError, match="go together"):
        channel_credentials(True, None, b"cert", None)
    with pytest.raises(ValueError, match="need tls=True"):
        channel_credentials(False, None, b"cert", b"key")
