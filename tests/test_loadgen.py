"""tandem.loadgen without a cluster: workloads, traces, statistics, the SSE parser, and both
backends end to end against tiny fake servers written here (HTTP/SSE and gRPC)."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import typer
from typer.testing import CliRunner

from tandem.loadgen import (
    GrpcBackend,
    HttpBackend,
    LengthRange,
    Request,
    RequestResult,
    Slo,
    load_trace,
    percentile,
    run_load,
    summarize,
    synthetic_workload,
    trace_workload,
)
from tandem.loadgen.cli import bench, make_workload
from tandem.loadgen.http_backend import error_message
from tandem.loadgen.report import build_report, json_line
from tandem.loadgen.sse import SSEDecoder
from tandem.loadgen.trace import TraceRow
from tandem.proto.v1 import tandem_pb2 as pb
from tandem.proto.v1 import tandem_pb2_grpc as pb_grpc

KEY, MODEL, LONGEST_PROMPT = "secret", "fake-model", 40  # the fake servers reject longer prompts


def synthetic(**overrides) -> list[Request]:
    spec = dict(num_requests=50, rate=2.0, prompt_len=LengthRange(10, 20),
                output_len=LengthRange(3, 9), seed=7) | overrides
    return synthetic_workload(**spec).requests


# -- workloads and traces -----------------------------------------------------------------------


def test_synthetic_lengths_and_token_ids_stay_in_range():
    for r in synthetic():
        assert 10 <= len(r.prompt) <= 20 and 3 <= r.max_tokens <= 9
        assert all(1000 <= t < 40000 for t in r.prompt)
    fixed = synthetic(prompt_len=LengthRange.parse("16"), output_len=LengthRange.parse("4"))
    assert {(len(r.prompt), r.max_tokens) for r in fixed} == {(16, 4)}
    assert LengthRange.parse("100-2000") == LengthRange(100, 2000)
    for bad in ("0", "9-3", "x", "-5"):
        with pytest.raises(ValueError):
            LengthRange.parse(bad)


def test_poisson_arrivals_repeat_for_a_seed_and_differ_across_seeds():
    arrivals = [r.arrival_s for r in synthetic()]
    assert arrivals == [r.arrival_s for r in synthetic()]
    assert arrivals != [r.arrival_s for r in synthetic(seed=8)]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals) and len(set(arrivals)) == 50


def test_constant_rate_spaces_arrivals_exactly_and_inf_sends_all_at_once():
    assert [r.arrival_s for r in synthetic(arrival="constant", rate=4.0)] == \
        [i / 4.0 for i in range(50)]
    assert {r.arrival_s for r in synthetic(rate=float("inf"))} == {0.0}


def test_duration_ends_synthetic_arrivals():
    requests = synthetic(num_requests=None, duration_s=3.0, arrival="constant", rate=2.0)
    assert [r.arrival_s for r in requests] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]


def test_shipped_traces_load_from_package_data():
    conv, code = load_trace("conv"), load_trace("code")
    assert (len(conv), len(code)) == (19366, 8819)  # data rows (the shared README said 1 fewer)
    assert conv[:2] == [TraceRow(0.0, 374, 44), TraceRow(4.314579, 396, 109)]
    assert code[0] == TraceRow(0.0, 4808, 10)
    for rows in (conv, code):
        assert [r.arrival_s for r in rows] == sorted(r.arrival_s for r in rows)
        assert 3400 < rows[-1].arrival_s < 3600  # about an hour each


def test_trace_files_load_plain_or_gzipped_with_numeric_or_date_timestamps(tmp_path: Path):
    plain = tmp_path / "t.csv"
    plain.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n10.5,7,3\n12.0,9,4\n")
    zipped = tmp_path / "t.csv.gz"
    zipped.write_bytes(gzip.compress(
        b"TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:00:00.5,7,3\r\n"
        b"2023-11-16 18:00:02.0,9,4\r\n"))
    for path in (plain, zipped):
        assert load_trace(path) == [TraceRow(0.0, 7, 3), TraceRow(1.5, 9, 4)]
    with pytest.raises(FileNotFoundError, match="shipped traces: conv, code"):
        load_trace("nope")
    (tmp_path / "bad.csv").write_text("time,prompt\n1,2\n")
    with pytest.raises(ValueError, match="missing column"):
        load_trace(tmp_path / "bad.csv")


def test_rate_scale_slows_the_replay_and_duration_cuts_scaled_arrivals():
    rows = [TraceRow(t, 100 * (i + 1), 10) for i, t in enumerate([0.0, 0.1, 0.2, 0.3, 0.4])]
    slow = trace_workload(rows, rate_scale=0.02)  # 2% of the trace's rate: gaps 50x longer
    assert [r.arrival_s for r in slow.requests] == pytest.approx([0, 5, 10, 15, 20])
    cut = trace_workload(rows, rate_scale=0.02, duration_s=12.0)
    assert [len(r.prompt) for r in cut.requests] == [100, 200, 300]
    assert cut.description["trace_rows"] == 5 and cut.description["num_requests"] == 3
    later = trace_workload(rows[2:], rate_scale=0.02)  # a replay starts at its first row
    assert [r.arrival_s for r in later.requests] == pytest.approx([0, 5, 10])
    with pytest.raises(ValueError, match="no trace rows"):
        trace_workload([])


def test_trace_replay_caps_count_and_clips_lengths():
    rows = [TraceRow(float(i), p, o) for i, (p, o) in enumerate([(50, 1), (500, 900), (5, 20)])]
    w = trace_workload(rows, num_requests=2, max_prompt=300, max_output=64, seed=1)
    assert [(len(r.prompt), r.max_tokens) for r in w.requests] == [(50, 1), (300, 64)]
    assert (w.description["prompts_clipped"], w.description["outputs_clipped"]) == (1, 1)
    assert [r.prompt for r in w.requests] == \
        [r.prompt for r in trace_workload(rows, num_requests=2, max_prompt=300, seed=1).requests]


# -- statistics ---------------------------------------------------------------------------------


def result(send, first, last, end, tokens, expected=None, code=None) -> RequestResult:
    r = RequestResult(expected or tokens, prompt_tokens=100, send=send, end=end, first=first,
                      last=last, completion_tokens=tokens)
    if code:
        r.fail(code, "failed")
    return r


HAND_MADE = [
    result(0.0, 0.1, 1.1, 1.2, 11),  # TTFT 0.1, TPOT 0.1
    result(1.0, 1.3, 2.3, 2.5, 6, expected=8),  # TTFT 0.3, TPOT 0.2, fewer tokens than asked
    result(2.0, 2.2, 2.2, 2.2, 1),  # TTFT 0.2, one token: no TPOT
    result(3.0, None, None, 4.0, 0, expected=5, code="HTTP 429"),
]


def test_percentiles_interpolate_between_order_statistics():
    assert percentile([], 50) is None and percentile([5.0], 99) == 5.0
    values = [4.0, 1.0, 3.0, 2.0]
    assert [percentile(values, q) for q in (0, 50, 90, 100)] == pytest.approx([1, 2.5, 3.7, 4])


def test_summary_counts_throughput_and_latency_over_successful_requests():
    s = summarize(HAND_MADE)
    assert (s.requests, s.completed, s.failed, s.wrong_length) == (4, 3, 1, 1)
    assert s.error_codes == {"HTTP 429": 1}
    assert s.duration_s == pytest.approx(4.0)  # first send to last end, the failure included
    assert s.request_throughput == pytest.approx(0.75)
    assert s.output_throughput == pytest.approx(18 / 4)
    assert s.total_token_throughput == pytest.approx(318 / 4)
    assert (s.ttft.mean, s.ttft.p50, s.ttft.p90) == pytest.approx((0.2, 0.2, 0.28))
    assert (s.tpot.p50, s.tpot.p99) == pytest.approx((0.15, 0.199))
    assert s.e2e.p50 == pytest.approx(1.2)
    assert s.goodput is None and s.good_requests is None  # no SLO given


@pytest.mark.parametrize(("slo", "good"), [
    (Slo(ttft_s=0.25), 2), (Slo(tpot_s=0.15), 2), (Slo(ttft_s=0.25, tpot_s=0.05), 1),
    (Slo(ttft_s=1.0, tpot_s=1.0), 3),  # the failed request never counts
])
def test_goodput_counts_requests_meeting_every_slo(slo: Slo, good: int):
    s = summarize(HAND_MADE, slo)
    assert s.good_requests == good and s.goodput == pytest.approx(good / 4.0)


def test_json_report_is_one_line_of_flat_keys():
    workload = synthetic_workload(num_requests=3, rate=1.0, prompt_len=LengthRange(5, 5),
                                  output_len=LengthRange(2, 2))
    report = build_report(summarize(HAND_MADE, Slo(ttft_s=0.25)), workload.description,
                          backend="http", target="http://x", model="m", max_concurrency=None,
                          warmup=0)
    line = json_line(report)
    assert "\n" not in line
    decoded = json.loads(line)
    for stat in ("mean", "p50", "p90", "p99"):
        assert {f"ttft_{stat}_s", f"tpot_{stat}_s", f"e2e_{stat}_s"} <= decoded.keys()
    assert {"request_throughput_req_s", "output_throughput_tok_s",
            "total_token_throughput_tok_s", "goodput_req_s", "error_codes", "backend", "model",
            "workload"} <= decoded.keys()
    assert decoded["error_codes"] == {"HTTP 429": 1} and decoded["goodput_req_s"] == 0.5
    assert decoded["workload"]["source"] == "synthetic"


# -- the SSE parser and the HTTP backend on canned streams --------------------------------------


def sse_stream(max_tokens: int, prompt_tokens: int, *, usage: bool = True) -> list[bytes]:
    """OpenAI completion events: one per token (the second with empty text, as for a held-back
    partial UTF-8 character), the last with finish_reason, then usage, then [DONE]."""
    events = [{"id": "cmpl-1", "object": "text_completion", "model": MODEL, "choices": [
        {"index": 0, "text": "" if i == 1 else "ab", "logprobs": None,
         "finish_reason": "length" if i == max_tokens - 1 else None}]}
        for i in range(max_tokens)]
    if usage:
        events.append({"id": "cmpl-1", "object": "text_completion", "model": MODEL,
                       "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                "completion_tokens": max_tokens,
                                                "total_tokens": prompt_tokens + max_tokens}})
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


def test_sse_decoder_reassembles_events_split_anywhere():
    stream = (b": keep-alive\n\n" b'data: {"a": 1}\r\n\r\n' b'data: {"b":\n'
              + 'data: "é"}\n\n'.encode() + b"event: end\ndata: [DONE]\n\n")
    want = ['{"a": 1}', '{"b":\n"é"}', "[DONE]"]
    for cut in range(len(stream) + 1):
        decoder = SSEDecoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) + decoder.close() == want
    decoder = SSEDecoder()
    assert [e for byte in stream for e in decoder.feed(bytes([byte]))] == want
    decoder = SSEDecoder()
    assert decoder.feed(b"data: unterminated") == [] and decoder.close() == ["unterminated"]


def test_error_bodies_give_their_message():
    body = b'{"error": {"message": "too long", "type": "BadRequestError", "param": "prompt", ' \
           b'"code": 400}}'
    assert error_message(body) == "too long"
    assert error_message(b"<html>bad gateway</html>") == "<html>bad gateway</html>"


def send_canned(chunks: list[bytes], status: int = 200) -> RequestResult:
    seen: list[dict] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))

        async def body() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        return httpx.Response(status, content=body())

    async def go() -> RequestResult:
        async with HttpBackend("http://fake/v1", model=MODEL,
                               transport=httpx.MockTransport(handler)) as backend:
            return await backend.send(Request(0.0, [1001, 1002], 4))

    out = asyncio.run(go())
    assert seen == [{"model": MODEL, "prompt": [1001, 1002], "max_tokens": 4, "temperature": 0,
                     "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}]
    return out


def test_http_backend_times_a_stream_cut_mid_line():
    data = b"".join(sse_stream(4, 2))
    r = send_canned([data[i:i + 7] for i in range(0, len(data), 7)])
    assert r.ok and r.finish_reason == "length"
    assert (r.prompt_tokens, r.completion_tokens, r.expected_tokens) == (2, 4, 4)
    assert r.send <= r.first <= r.last <= r.end


def test_http_backend_counts_token_events_without_usage():
    r = send_canned(sse_stream(4, 2, usage=False))
    assert r.ok and r.completion_tokens == 4  # the empty-text event counts as a token


@pytest.mark.parametrize(("chunks", "status", "code", "message"), [
    ([b'{"error": {"message": "prompt too long", "type": "BadRequestError", "param": "prompt",'
      b' "code": 400}}'], 400, "HTTP 400", "prompt too long"),
    ([sse_stream(4, 2)[0], b'data: {"error": {"message": "engine died", "type": "Internal", '
      b'"param": null, "code": 500}}\n\n'], 200, "stream: 500", "engine died"),
    (sse_stream(4, 2)[:2], 200, "INCOMPLETE", "the stream ended without a finish_reason"),
])
def test_http_backend_records_failures_by_code(chunks, status, code, message):
    r = send_canned(chunks, status)
    assert not r.ok and (r.error_code, r.error) == (code, message)


# -- end to end against fake servers ------------------------------------------------------------


class FakeOpenAIServer:
    """A tiny OpenAI-compatible HTTP/1.1 server on its own thread: /v1/models and streamed
    /v1/completions, answering 401 without the key and 400 for prompts over LONGEST_PROMPT."""

    def __init__(self) -> None:
        self.in_flight = self.most_in_flight = self.completions = 0
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self.thread.start()
        started.wait()

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        started.set()
        self.loop.run_forever()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        request_line, *lines = head.split("\r\n")
        method, path, _ = request_line.split(" ")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
        body = await reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("authorization") != f"Bearer {KEY}":
            await self._reply(writer, 401, {"error": {"message": "bad key", "type": "auth",
                                                      "param": None, "code": 401}})
        elif (method, path) == ("GET", "/v1/models"):
            await self._reply(writer, 200, {"object": "list", "data": [
                {"id": MODEL, "object": "model", "max_model_len": 4096}]})
        elif (method, path) == ("POST", "/v1/completions"):
            request = json.loads(body)
            assert request["model"] == MODEL and request["ignore_eos"] and request["stream"]
            if len(request["prompt"]) > LONGEST_PROMPT:
                await self._reply(writer, 400, {"error": {
                    "message": "prompt too long", "type": "BadRequestError", "param": "prompt",
                    "code": 400}})
            else:
                await self._stream(writer, request)
        else:
            await self._reply(writer, 404, {"error": {"message": path, "type": "NotFound",
                                                      "param": None, "code": 404}})
        writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: "
                     f"{len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        await writer.drain()

    async def _stream(self, writer: asyncio.StreamWriter, request: dict) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Connection: close\r\n\r\n: keep-alive\n\n")
        *events, done = sse_stream(request["max_tokens"], len(request["prompt"]))
        for event in events:
            for half in (event[:9], event[9:]):  # every event reaches the client in two pieces
                writer.write(half)
                await writer.drain()
                await asyncio.sleep(0)
        self.in_flight -= 1  # before [DONE], so the client's slot is still held
        self.completions += 1
        writer.write(done)
        await writer.drain()


@pytest.fixture
def openai_server() -> Iterator[FakeOpenAIServer]:
    server = FakeOpenAIServer()
    yield server
    server.close()


def tandem_app() -> typer.Typer:
    """The command registered as tandem/cli.py does it."""
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    app.command("bench")(bench)
    return app


def test_bench_over_http_prints_the_table_and_a_json_line(openai_server: FakeOpenAIServer):
    options = dict(num_requests=12, rate=float("inf"), arrival="poisson", prompt_len="30-50",
                   output_len="3-6", rate_scale=1.0, duration=None, max_prompt=None,
                   max_output=None, seed=1)
    requests = make_workload("synthetic", **options).requests
    too_long = sum(len(r.prompt) > LONGEST_PROMPT for r in requests)
    assert 0 < too_long < len(requests)
    args = ["bench", "--http-url", openai_server.url, "--num-requests", "12", "--rate", "inf",
            "--prompt-len", "30-50", "--output-len", "3-6", "--seed", "1",
            "--max-concurrency", "2", "--slo-ttft", "60", "--json"]
    out = CliRunner().invoke(tandem_app(), args, env={"TANDEM_API_KEY": KEY})
    assert out.exit_code == 0, out.output
    print(out.stdout)
    assert "Successful requests" in out.stdout and "TTFT" in out.stdout
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert (report["backend"], report["model"], report["max_concurrency"]) == ("http", MODEL, 2)
    assert (report["requests"], report["completed"]) == (12, 12 - too_long)
    assert report["error_codes"] == {"HTTP 400": too_long} and report["wrong_length"] == 0
    assert report["completion_tokens"] == sum(r.max_tokens for r in requests
                                              if len(r.prompt) <= LONGEST_PROMPT)
    assert report["good_requests"] == 12 - too_long and report["ttft_p99_s"] is not None
    assert openai_server.completions == 12 - too_long and openai_server.most_in_flight <= 2


def test_bench_fails_in_one_line_without_the_right_key(openai_server: FakeOpenAIServer):
    out = CliRunner().invoke(tandem_app(), ["bench", "--http-url", openai_server.url,
                                            "--api-key", "wrong", "--no-progress"])
    assert out.exit_code == 1 and "HTTP 401: bad key" in out.stderr


class FakeTandem(pb_grpc.TandemServicer):
    """A gateway that streams one token per message and rejects prompts over LONGEST_PROMPT."""

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[pb.ModelInfo(id=MODEL, max_model_len=4096)])

    async def Generate(self, request, context):
        prompt, n = list(request.token_ids.ids), request.sampling.max_tokens
        if len(prompt) > LONGEST_PROMPT:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt too long")
        for _ in range(n - 1):
            yield pb.GenerateResponse(request_id="r", text="a", token_ids=[1234])
        yield pb.GenerateResponse(
            request_id="r", text="a", token_ids=[1234], finish_reason="length",
            usage=pb.Usage(prompt_tokens=len(prompt), completion_tokens=n),
            timings=pb.Timings(ttft_s=0.01, total_s=0.02))


def test_grpc_backend_runs_a_workload_against_a_fake_gateway():
    workload = synthetic_workload(num_requests=8, rate=float("inf"),
                                  prompt_len=LengthRange(30, 50), output_len=LengthRange(2, 5),
                                  seed=1)
    too_long = sum(len(r.prompt) > LONGEST_PROMPT for r in workload.requests)
    assert 0 < too_long < 8

    async def go():
        server = grpc.aio.server()
        pb_grpc.add_TandemServicer_to_server(FakeTandem(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with GrpcBackend(f"127.0.0.1:{port}", timeout=30) as backend:
                served = await backend.served_model()
                return served, await run_load(workload, backend, max_concurrency=3)
        finally:
            await server.stop(None)

    served, run = asyncio.run(go())
    assert (served.id, served.max_model_len) == (MODEL, 4096)
    s = summarize(run.results)
    assert (s.completed, s.error_codes) == (8 - too_long, {"INVALID_ARGUMENT": too_long})
    assert s.wrong_length == 0 and all(r.timings is not None for r in run.results if r.ok)
    assert s.tpot.p50 is not None and s.ttft.p50 is not None
