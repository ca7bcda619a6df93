"""`tandem bench` replays a short slice of the shipped Azure conversation trace against the
session's real cluster, over gRPC and over the HTTP API, and prints its table and JSON."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tandem.cli import app
from tandem.loadgen import load_trace

pytestmark = pytest.mark.slow

# The first 20 rows of conv arrive within 13 s; at 4x the trace's rate they come in ~3 s.
# Lengths are clipped to keep this seconds long on two CPU cores.
REPLAY = ["--dataset", "conv", "--num-requests", "20", "--rate-scale", "4",
          "--max-prompt", "48", "--max-output", "4", "--no-progress", "--json",
          "--slo-ttft", "60", "--slo-tpot", "10"]


@pytest.mark.parametrize("backend", ["grpc", "http"])
def test_bench_replays_twenty_trace_requests(server, backend):
    target = ["--address", server.address] if backend == "grpc" else \
        ["--http-url", server.http_url]
    result = CliRunner().invoke(app, ["bench", *target, *REPLAY])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["completed"] == 20 and report["failed"] == 0
    assert report["ttft_p50_s"] > 0 and report["e2e_p99_s"] >= report["ttft_p50_s"]
    assert report["completion_tokens"] == sum(min(4, r.output_tokens)
                                              for r in load_trace("conv")[:20])
    assert "TTFT" in result.output  # the table
    server.wait_idle(timeout=60)
