"""Load through random faults (`TANDEM_FAULTS`): KV transfers fail or stall, store reads fail or
stall, worker steps stall. Every request either finishes with the undisturbed tokens or fails
with a clear status before its deadline, and no block stays held."""

from __future__ import annotations

import threading

import grpc
import pytest

from tandem.client import Client, TandemError
from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.llm import LLM
from tandem.engine.sampling_params import SamplingParams

from .conftest import serve_config

pytestmark = pytest.mark.slow

FAULTS = ("transfer.fail=0.2,transfer.stall=0.2,store.fail=0.3,store.stall=0.2,"
          "step.stall=0.02,stall.s=1")
DEADLINE_S = 90.0
CLEAR_FAILURES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                  grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INTERNAL}
# Long enough (>= 256 tokens) that the second use of each prompt reads the KV store.
PROMPTS = [" ".join([f"Report {i}: the river rose by {i} feet overnight and the mill stopped."]
                    * 20) for i in range(4)]


@pytest.fixture(scope="module")
def faulty(ray_cluster):
    from .serving import ServerThread, tandem_faults

    with tandem_faults(FAULTS):
        running = ServerThread(serve_config(
            worker={"handoff_timeout_s": 10.0, "kv_store": {"cpu_gb": 0.2, "ssd_gb": 0}}))
    yield running
    running.close()


def test_every_request_finishes_right_or_fails_clearly(faulty, loaded_fp32):
    llm = LLM.from_engine(LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1),
                                    loaded=loaded_fp32))
    params = SamplingParams(max_tokens=6, temperature=0)
    want = {p: o.token_ids for p, o in zip(PROMPTS, llm.generate(PROMPTS, params),
                                           strict=True)}
    outcomes: list[tuple[str, object]] = []

    def run(prompt: str) -> None:
        with Client(faulty.address, timeout=DEADLINE_S) as client:
            try:
                outcomes.append((prompt, client.generate(prompt, max_tokens=6,
                                                         temperature=0).token_ids))
            except TandemError as e:
                outcomes.append((prompt, e))

    for _ in range(2):  # the second round finds the first round's KV in the store
        threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE_S + 30)
            assert not t.is_alive(), "a request outlived its deadline"
    assert len(outcomes) == 2 * len(PROMPTS)
    for prompt, outcome in outcomes:
        if isinstance(outcome, TandemError):
            assert outcome.code() in CLEAR_FAILURES, outcome
            assert outcome.details()
        else:
            assert outcome == want[prompt]
    assert any(not isinstance(o, TandemError) for _, o in outcomes)
    faulty.wait_idle(timeout=120)
