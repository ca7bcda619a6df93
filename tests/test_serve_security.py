"""The gateway under TLS with client certificates and API keys, and every input bounded, on one
real cluster (Ray workers, gRPC KV handoff under the cluster's mTLS, certificates made here)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.client import Client, TandemError
from tandem.cluster.gateway import PREFILL_WORKER_KEY
from tandem.proto.v1 import tandem_pb2 as pb
from tandem.proto.v1 import tandem_pb2_grpc as pb_grpc
from tandem.tls import make_dev_certs

from .conftest import serve_config

pytestmark = pytest.mark.slow

KEYS = ["key-of-alice", "key-of-bob"]
MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_dev_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def cluster(ray_cluster, certs):
    from .serving import ServerThread

    config = serve_config(
        gateway={"api_keys": KEYS, "tls": {"cert": str(certs["node.pem"]),
                                           "key": str(certs["node.key"]),
                                           "client_ca": str(certs["ca.pem"])}},
        worker={"kv_transport": "grpc", "engine": {"max_model_len": MAX_MODEL_LEN},
                "kv_store": {"enabled": False},
                "tls": {"ca": str(certs["ca.pem"]), "cert": str(certs["node.pem"]),
                        "key": str(certs["node.key"])}})
    running = ServerThread(config)
    yield running
    running.close()


def client(cluster, certs, key: str | None = KEYS[0], **overrides) -> Client:
    settings = dict(tls=True, root_certificates=certs["ca.pem"].read_bytes(),
                    client_certificate=certs["node.pem"].read_bytes(),
                    client_key=certs["node.key"].read_bytes(), api_key=key, timeout=60,
                    max_retries=0) | overrides
    return Client(cluster.address, **settings)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(TandemError) as caught:
        call()
    return caught.value.code()


def test_the_right_certificate_and_key_are_served_over_the_mtls_kv_hop(cluster, certs):
    with client(cluster, certs) as c:
        out = c.generate("The capital of France is", max_tokens=4, temperature=0)
    assert len(out.token_ids) == 4
    stats = cluster.stats()
    assert sum(s.handoffs.get("grpc/onepiece", 0) + s.handoffs.get("grpc/layerwise", 0)
               for s in stats) >= 1


def test_kv_receivers_of_a_local_cluster_bind_loopback(cluster):
    receivers = [r for rs in cluster.server.router.kv_receivers for r in rs]
    assert receivers and all(r.address.startswith("127.0.0.1:") for r in receivers)


def test_a_plaintext_client_is_refused(cluster):
    with Client(cluster.address, api_key=KEYS[0], timeout=10, max_retries=0) as c:
        assert code_of(lambda: c.list_models()) == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_ca_is_refused(cluster, certs, tmp_path):
    other = make_dev_certs(tmp_path)
    with client(cluster, certs, root_certificates=other["ca.pem"].read_bytes(),
                timeout=10) as c:
        assert code_of(lambda: c.list_models()) == grpc.StatusCode.UNAVAILABLE


def test_a_client_without_a_certificate_is_refused(cluster, certs):
    with client(cluster, certs, client_certificate=None, client_key=None, timeout=10) as c:
        assert code_of(lambda: c.list_models()) == grpc.StatusCode.UNAVAILABLE


def test_a_missing_or_wrong_api_key_is_unauthenticated_and_health_stays_open(cluster, certs):
    for key in (None, "not-a-key"):
        with client(cluster, certs, key=key) as c:
            assert code_of(lambda c=c: c.list_models()) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda c=c: c.generate("Hi", max_tokens=1)) \
                == grpc.StatusCode.UNAUTHENTICATED
            assert c.health()


def test_only_the_key_that_made_a_request_can_abort_it(cluster, certs):
    with client(cluster, certs, key=KEYS[0]) as alice, client(cluster, certs, key=KEYS[1]) as bob:
        stream = alice.stream("Count slowly:", max_tokens=200, ignore_eos=True, temperature=0,
                              request_id="alice-1")
        next(iter(stream))  # running now
        assert code_of(lambda: bob.abort("alice-1")) == grpc.StatusCode.PERMISSION_DENIED
        assert alice.abort("alice-1")
        assert list(stream)[-1].finish_reason == "abort"
    cluster.wait_idle()


def test_the_routing_hint_needs_debug_routing(cluster, certs):
    creds = grpc.ssl_channel_credentials(certs["ca.pem"].read_bytes(),
                                         certs["node.key"].read_bytes(),
                                         certs["node.pem"].read_bytes())
    with grpc.secure_channel(cluster.address, creds) as channel:
        stub = pb_grpc.TandemStub(channel)
        request = pb.GenerateRequest(text="Hi", sampling=pb.SamplingOptions(max_tokens=1))
        metadata = (("authorization", f"Bearer {KEYS[0]}"), (PREFILL_WORKER_KEY, "0"))
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(request, metadata=metadata, timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--debug-routing" in caught.value.details()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_each_bound_holds(cluster, certs):
    ids = list(range(1000, 1000 + MAX_MODEL_LEN - 3))  # leaves 3 tokens of context
    with client(cluster, certs) as c:
        bad = {
            "max_tokens": lambda: c.generate(ids, max_tokens=4),
            "stop": lambda: c.generate("Hi", stop=[str(i) for i in range(17)]),
            "segments": lambda: c.generate(segments=["p", *["a passage of words"] * 63, "q?"]),
            "request_id": lambda: c.generate("Hi", request_id="x" * 129),
            "cache_salt": lambda: c.generate("Hi", cache_salt="s" * 257),
        }
        for field, call in bad.items():
            with pytest.raises(TandemError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert field in str(caught.value), str(caught.value)
        assert code_of(lambda: c.tokenize("x" * (5 << 20))) \
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        clamped = c.generate(ids, temperature=0, ignore_eos=True)  # max_tokens left out
        assert len(clamped.token_ids) == 3 and clamped.finish_reason == "length"
        assert c.generate("Still serving", max_tokens=2).usage.completion_tokens == 2
    cluster.wait_idle()
