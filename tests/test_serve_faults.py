"""Failure paths on a real cluster started with injected faults (`TANDEM_FAULTS`): every KV
transfer is corrupted in transit and every worker step and transfer is slowed down; the decode
pool is tiny and the admission queue holds one request."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from tandem.client import Client, TandemError

from .conftest import serve_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def faulty(ray_cluster):
    from .serving import ServerThread, tandem_faults

    with tandem_faults("transfer.corrupt=1.0,transfer.delay=1.0,step.delay=0.5"):
        running = ServerThread(serve_config(
            worker={"engine": {"dtype": "float32", "num_kv_blocks": 8, "num_threads": 1}},
            gateway={"port": 0, "max_queued_requests": 1}))
    yield running
    running.close()


def test_corrupted_kv_is_caught_by_the_checksum_and_fails_cleanly(faulty):
    with Client(faulty.address, timeout=60) as client:
        with pytest.raises(TandemError) as err:
            client.generate("The quick brown fox", max_tokens=4, temperature=0)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        assert "checksum" in err.value.details()
        assert client.health() is True  # the server keeps serving
    faulty.wait_idle()


def test_full_admission_queue_is_resource_exhausted_and_queued_requests_can_abort(faulty):
    errors: dict[str, TandemError] = {}
    finish: dict[str, str] = {}

    def run(name: str, prompt: list[int]) -> None:
        with Client(faulty.address, timeout=60) as client:
            try:
                out = client.generate(prompt, max_tokens=4, temperature=0, request_id=name)
                finish[name] = out.finish_reason
            except TandemError as e:
                errors[name] = e

    # A holds 7 of the decode worker's 8 blocks while it prefills (slowly); B needs 3 and
    # waits in the admission queue; C finds the queue full.
    a = threading.Thread(target=run, args=("a", [42] * 100))
    a.start()
    faulty.wait_until(lambda stats: any(s.engine.num_reserved for s in stats), timeout=30)
    b = threading.Thread(target=run, args=("b", [43] * 40))
    b.start()
    deadline = time.monotonic() + 30
    while faulty.server.router.num_queued < 1:
        assert time.monotonic() < deadline, "B never queued"
        time.sleep(0.01)
    run("c", [44] * 10)
    with Client(faulty.address, timeout=60) as client:
        assert client.abort("b") is True  # still waiting for blocks
    a.join(60)
    b.join(60)
    assert errors["c"].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queued_requests" in errors["c"].details()
    assert finish == {"b": "abort"}
    assert errors["a"].code() == grpc.StatusCode.DATA_LOSS
    faulty.wait_idle()
