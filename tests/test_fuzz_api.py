"""Hostile requests against the real gateway: every kind gets a clear error naming what is wrong
(never INTERNAL), the server keeps serving, and no block or session is left behind.

Requests go through raw gRPC stubs (and raw bytes), past the SDK's own checks."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.proto.v1 import tandem_pb2 as pb
from tandem.proto.v1 import tandem_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

VOCAB = 49152
CONTEXT = 8192
FUZZ = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
BAD = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.TandemStub(channel), channel


def generate(stub, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    return list(stub[0].Generate(request, timeout=60))


def sampled(**options) -> pb.SamplingOptions:
    return pb.SamplingOptions(max_tokens=1, **options)


def refused(call, code: grpc.StatusCode = BAD, names: str | None = None) -> str:
    """Run `call`, which must fail with `code` and a message naming `names`."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == code, (error.code(), error.details())
    if names is not None:
        assert names in error.details(), error.details()
    return error.details()


def served_or_refused(call, names: str) -> None:
    """A borderline input may be served; if refused, it is INVALID_ARGUMENT naming `names`."""
    try:
        call()
    except grpc.RpcError as error:
        assert error.code() == BAD and names in error.details(), (error.code(), error.details())


def request(**fields) -> pb.GenerateRequest:
    fields.setdefault("sampling", sampled())
    if not any(k in fields for k in ("text", "token_ids", "messages", "segments")):
        fields["text"] = "Hello"
    return pb.GenerateRequest(**fields)


# -- prompts ---------------------------------------------------------------------------------

@FUZZ
@given(st.text(max_size=120))
def test_any_text_with_control_characters(stub, text):
    served_or_refused(lambda: generate(stub, request(text=text)), "prompt")


@FUZZ
@given(st.lists(st.integers(VOCAB, 2**32 - 1), min_size=1, max_size=8))
def test_token_ids_outside_the_vocabulary(stub, ids):
    refused(lambda: generate(stub, request(token_ids=pb.TokenIds(ids=ids))), names="prompt")


@FUZZ
@given(st.integers(CONTEXT, CONTEXT + 64))
def test_token_ids_that_fill_the_context(stub, n):
    ids = pb.TokenIds(ids=[1000] * n)
    refused(lambda: generate(stub, request(token_ids=ids)), names="prompt")


def test_empty_and_missing_prompts(stub):
    refused(lambda: generate(stub, request(token_ids=pb.TokenIds())), names="prompt")
    refused(lambda: generate(stub, request(text="")), names="prompt")
    refused(lambda: generate(stub, pb.GenerateRequest(sampling=sampled())), names="prompt")
    refused(lambda: generate(stub, request(messages=pb.ChatMessages())), names="prompt")


# -- sampling options --------------------------------------------------------------------------

@FUZZ
@given(st.integers(-2**31, 0))
def test_max_tokens_zero_or_negative(stub, n):
    refused(lambda: generate(stub, request(sampling=pb.SamplingOptions(max_tokens=n))),
            names="max_tokens")


@FUZZ
@given(st.integers(CONTEXT, 2**31 - 1))
def test_max_tokens_beyond_the_context(stub, n):
    refused(lambda: generate(stub, request(sampling=pb.SamplingOptions(max_tokens=n))),
            names="max_tokens")


@FUZZ
@given(st.one_of(st.just(float("nan")), st.just(float("inf")), st.floats(max_value=-1e-30)))
def test_temperature_nan_inf_or_negative(stub, t):
    refused(lambda: generate(stub, request(sampling=sampled(temperature=t))),
            names="temperature")


@FUZZ
@given(st.floats(min_value=0, max_value=1e-3))
def test_temperature_tiny_is_greedy(stub, t):
    assert generate(stub, request(sampling=sampled(temperature=t)))[-1].finish_reason


@FUZZ
@given(st.one_of(st.just(float("nan")), st.floats(max_value=0), st.floats(min_value=1.0001)))
def test_top_p_outside_zero_one(stub, p):
    refused(lambda: generate(stub, request(sampling=sampled(top_p=p))), names="top_p")


@FUZZ
@given(st.integers(-2**31, -1))
def test_top_k_negative(stub, k):
    refused(lambda: generate(stub, request(sampling=sampled(top_k=k))), names="top_k")


@FUZZ
@given(st.integers(VOCAB, 2**31 - 1), st.integers(-2**63, 2**63 - 1))
def test_top_k_beyond_the_vocabulary_and_any_seed_are_served(stub, k, seed):
    assert generate(stub, request(sampling=sampled(top_k=k, seed=seed)))[-1].finish_reason


@FUZZ
@given(st.lists(st.text(min_size=1, max_size=4), min_size=17, max_size=40))
def test_too_many_stop_strings(stub, stops):
    refused(lambda: generate(stub, request(sampling=sampled(stop=stops))), names="stop")


@FUZZ
@given(st.text(min_size=257, max_size=600))
def test_a_stop_string_too_long(stub, stop):
    refused(lambda: generate(stub, request(sampling=sampled(stop=[stop]))), names="stop")


def test_an_empty_stop_string(stub):
    refused(lambda: generate(stub, request(sampling=sampled(stop=[""]))), names="stop")


@FUZZ
@given(st.one_of(st.just(""), st.text(min_size=257, max_size=400)))
def test_a_cache_salt_empty_or_too_long(stub, salt):
    refused(lambda: generate(stub, request(sampling=sampled(cache_salt=salt))),
            names="cache_salt")


# -- fields around the prompt ------------------------------------------------------------------

@FUZZ
@given(st.text(min_size=1, max_size=40).filter(lambda m: m != "smollm2-135m-instruct"))
def test_an_unknown_model(stub, model):
    refused(lambda: generate(stub, request(model=model)), names="model")


@FUZZ
@given(st.one_of(st.text(min_size=129, max_size=300),
                 st.text(min_size=1, max_size=20).map(lambda s: s + "\n\x00")))
def test_a_request_id_too_long_or_unprintable(stub, rid):
    refused(lambda: generate(stub, request(request_id=rid)), names="request_id")


@FUZZ
@given(st.text(max_size=10).filter(lambda r: r not in ("system", "user", "assistant", "tool")))
def test_a_chat_role_that_does_not_exist(stub, role):
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(role=role, content="hi")])
    refused(lambda: generate(stub, request(messages=msgs)), names="messages[0].role")


@FUZZ
@given(st.sampled_from(["{{ 7 * 7 }}", "{% for x in range(99999999) %}x{% endfor %}",
                        "{{ ''.__class__.__mro__ }}", "{% raw %}", "\x00\x01\x02", "}}" * 50]))
def test_template_syntax_in_a_message_is_only_text(stub, content):
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=content)])
    served_or_refused(lambda: generate(stub, request(messages=msgs)), "messages")


def test_too_many_chat_messages(stub):
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="a")] * 1025)
    refused(lambda: generate(stub, request(messages=msgs)), names="messages")


# -- segments -----------------------------------------------------------------------------------

PASSAGE = "The harbour master counted the boats again before dawn."


@FUZZ
@given(st.integers(0, 1))
def test_too_few_segments(stub, n):
    segments = pb.Segments(texts=["Question?"] * n)
    refused(lambda: generate(stub, request(segments=segments)), names="segments")


@FUZZ
@given(st.integers(65, 400))
def test_too_many_segments(stub, n):
    segments = pb.Segments(texts=["p", *[PASSAGE] * (n - 2), "q?"])
    refused(lambda: generate(stub, request(segments=segments)), names="segments")


@FUZZ
@given(st.sampled_from(["", "a", "ok.", "x y"]), st.integers(1, 3))
def test_an_empty_or_tiny_chunk(stub, chunk, where):
    texts = ["p", PASSAGE, PASSAGE, PASSAGE, "q?"]
    texts[where] = chunk
    refused(lambda: generate(stub, request(segments=pb.Segments(texts=texts))),
            names=f"segments[{where}]")


@FUZZ
@given(st.one_of(st.just(float("nan")), st.floats(max_value=-1e-6), st.floats(min_value=1.01)))
def test_a_recompute_ratio_outside_zero_one(stub, ratio):
    segments = pb.Segments(texts=["p", PASSAGE, "q?"], recompute_ratio=ratio)
    refused(lambda: generate(stub, request(segments=segments)), names="recompute_ratio")


# -- bytes that are not a request ----------------------------------------------------------------

def raw_generate(stub, payload: bytes):
    call = stub[1].unary_stream("/tandem.v1.Tandem/Generate",
                                request_serializer=lambda b: b,
                                response_deserializer=pb.GenerateResponse.FromString)
    return list(call(payload, timeout=30))


@FUZZ
@given(st.binary(min_size=1, max_size=6).map(lambda b: b"\xff" + b))
def test_invalid_utf8_in_a_string_field(stub, tail):
    text = b"Hello" + tail
    payload = b"\x1a" + bytes([len(text)]) + text  # field 3 (text), length-delimited
    refused(lambda: raw_generate(stub, payload), names="not a valid tandem.v1.GenerateRequest")


@FUZZ
@given(st.integers(1, 20))
def test_a_truncated_message(stub, cut):
    whole = request(text="Hello there, how are you today?").SerializeToString()
    refused(lambda: raw_generate(stub, whole[:-cut] if cut < len(whole) else whole[:1]),
            names="not a valid")


def test_deeply_nested_unknown_fields(stub):
    depth = 1000  # unknown field 15 as groups, each inside the last: past any recursion limit
    nested = b"\x7b" * depth + b"\x7c" * depth
    refused(lambda: raw_generate(stub, nested), names="not a valid")


def test_a_message_over_the_size_limit(stub):
    big = request(text="a" * (5 << 20))
    refused(lambda: generate(stub, big), grpc.StatusCode.RESOURCE_EXHAUSTED)


# -- the other methods ----------------------------------------------------------------------------

def test_tokenize_and_abort_bad_fields(stub):
    tokenize, abort = stub[0].Tokenize, stub[0].Abort
    refused(lambda: tokenize(pb.TokenizeRequest(text=""), timeout=10), names="text")
    refused(lambda: tokenize(pb.TokenizeRequest(text="x", model="nope"), timeout=10),
            names="model")
    refused(lambda: abort(pb.AbortRequest(request_id=""), timeout=10), names="request_id")
    assert not abort(pb.AbortRequest(request_id="never-ran"), timeout=10).found


def test_after_all_that_the_server_serves_and_holds_nothing(stub, server):
    out = generate(stub, request(text="Still there?", sampling=pb.SamplingOptions(
        max_tokens=3, temperature=0)))
    assert out[-1].finish_reason and sum(len(r.token_ids) for r in out) >= 1
    server.wait_idle()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)
