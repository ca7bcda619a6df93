"""KV handoff end to end on real Ray clusters: NIXL (UCX over loopback) and gRPC, layer-wise and
in one piece, give the single engine's greedy tokens; killing the decode worker mid-transfer
fails the request cleanly and leaks no blocks on the prefill worker."""

from __future__ import annotations

import os
import threading
import time

import grpc
import pytest
import ray

from tandem.client import Client, TandemError
from tandem.engine.sampling_params import SamplingParams

from .conftest import require_nixl, serve_config

pytestmark = pytest.mark.slow

LONG = " ".join(f"Item {i}: the river runs past the old mill and under the bridge." for i in
                range(40))  # ~600 tokens: many blocks per layer, several prefill chunks
SHORT = "The capital of France is"


def needs_nixl():
    require_nixl()


@pytest.fixture(scope="module")
def reference(loaded_fp32):
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import LLMEngine
    from tandem.engine.llm import LLM

    llm = LLM.from_engine(LLMEngine(EngineConfig(dtype="float32", num_threads=1), loaded_fp32))
    params = SamplingParams(max_tokens=8, temperature=0)
    return {p: out.token_ids for p, out in zip((LONG, SHORT), llm.generate([LONG, SHORT], params),
                                               strict=True)}


def start(transport: str, streaming: str, **worker):
    from .serving import ServerThread

    return ServerThread(serve_config(worker={
        "engine": {"dtype": "float32", "kv_cache_gb": 0.05, "num_threads": 1,
                   "max_num_batched_tokens": 256},
        "kv_transport": transport, "kv_streaming": streaming, **worker}))


@pytest.mark.parametrize(("transport", "streaming"), [
    ("nixl", "layerwise"), ("grpc", "layerwise"), ("grpc", "onepiece")])
def test_greedy_output_matches_single_engine_over_each_transport(
        ray_cluster, reference, transport, streaming):
    if transport == "nixl":
        needs_nixl()
    running = start(transport, streaming)
    try:
        with Client(running.address, timeout=120) as client:
            for prompt in (LONG, SHORT):
                out = client.generate(prompt, max_tokens=8, temperature=0)
                assert out.token_ids == reference[prompt], prompt[:20]
        prefill_stats = running.wait_idle()[0]
        assert prefill_stats.handoffs == {f"{transport}/{streaming}": 2}
    finally:
        running.close()


def test_auto_uses_nixl_and_streams_long_prompts_layer_by_layer(server, reference):
    needs_nixl()
    before = server.stats()[0].handoffs
    with Client(server.address, timeout=120) as client:
        for prompt in (LONG, SHORT):
            assert client.generate(prompt, max_tokens=8, temperature=0).token_ids \
                == reference[prompt]
    after = server.wait_idle()[0].handoffs
    gained = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert gained == {**{k: 0 for k in after}, "nixl/layerwise": 1, "nixl/onepiece": 1}


def test_killing_the_decode_worker_mid_transfer_fails_the_request_and_frees_blocks(ray_cluster):
    needs_nixl()
    from .serving import ServerThread

    previous = os.environ.get("TANDEM_FAULTS")
    os.environ["TANDEM_FAULTS"] = "step.delay=0.4"  # ~3 prefill chunks: 1.2 s of streaming
    try:
        running = ServerThread(serve_config(worker={
            "engine": {"dtype": "float32", "kv_cache_gb": 0.05, "num_threads": 1,
                       "max_num_batched_tokens": 256},
            "kv_transport": "nixl", "kv_streaming": "layerwise", "handoff_timeout_s": 3}))
    finally:
        if previous is None:
            del os.environ["TANDEM_FAULTS"]
        else:
            os.environ["TANDEM_FAULTS"] = previous
    prefill, decode = running.server.prefill_workers[0], running.server.decode_workers[0]
    outcome: dict[str, object] = {}

    def call() -> None:
        started = time.monotonic()
        with Client(running.address, timeout=60) as client:
            try:
                client.generate(LONG, max_tokens=8, temperature=0)
            except TandemError as e:
                outcome["error"] = e
        outcome["seconds"] = time.monotonic() - started

    try:
        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.monotonic() + 60
        while ray.get(prefill.stats.remote(), timeout=30).engine.num_running == 0:
            assert time.monotonic() < deadline, "the prefill never started"
            time.sleep(0.05)
        time.sleep(0.5)  # some layers have been written into the decode worker by now
        ray.kill(decode)
        thread.join(30)
        assert not thread.is_alive(), "the request did not end after the decode worker died"
        error = outcome.get("error")
        assert isinstance(error, TandemError), outcome
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "unavailable" in error.details().lower() or "died" in error.details().lower()
        # Within the handoff deadline (3 s) plus the prefill still running, the prefill
        # worker gives the request up and frees every block it held.
        deadline = time.monotonic() + 20
        while True:
            stats = ray.get(prefill.stats.remote(), timeout=30)
            if stats.engine.num_free_blocks == stats.engine.num_blocks \
                    and stats.num_open_requests == 0 and stats.engine.num_prefilled == 0:
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.1)
    finally:
        running.close()
