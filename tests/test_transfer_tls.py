"""Mutual TLS on the gRPC KV hop, over real loopback connections: a handoff under the cluster CA
lands intact; a plaintext sender, a sender with a certificate from another CA and one with no
client certificate are refused at the handshake, at once and with an error that names TLS, and
never reach the sink. Also `tandem certs`, which makes the certificates."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
import torch
from typer.testing import CliRunner

from tandem.cli import app
from tandem.engine.kv_cache import KVCache
from tandem.tls import ClusterTLS, make_dev_certs
from tandem.transfer import make_transport
from tandem.transfer.base import Handoff, KVTarget
from tandem.transfer.errors import TransferUnavailable

from .test_transfer import DST_BLOCKS, IDENTITY, SPEC, SRC_BLOCKS, Sink, filled_pool, same_bytes


class NoClientCert(ClusterTLS):
    """Trusts the cluster CA but presents no certificate of its own."""

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes())


def cluster_tls(ca_dir: Path, node_dir: Path | None = None) -> ClusterTLS:
    node_dir = node_dir or ca_dir
    return ClusterTLS(ca=ca_dir / "ca.pem", cert=node_dir / "node.pem", key=node_dir / "node.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, ClusterTLS | None]:
    """Settings by name: the cluster's, plaintext, and the wrong ones."""
    ours, theirs = tmp_path_factory.mktemp("cluster-ca"), tmp_path_factory.mktemp("other-ca")
    make_dev_certs(ours)
    make_dev_certs(theirs)
    cluster = cluster_tls(ours)
    return {
        "cluster": cluster,
        "plaintext": None,
        "other-ca": cluster_tls(theirs),  # a whole other cluster: CA and certificate
        "cert-of-other-ca": cluster_tls(ours, theirs),  # trusts ours, presents theirs
        "no-client-cert": NoClientCert(**cluster.model_dump()),
    }


async def handoff(receiver_tls: ClusterTLS | None, sender_tls: ClusterTLS | None,
                  sink: Sink, num_tokens: int = 100) -> tuple[KVCache, KVCache]:
    """One gRPC handoff of request r1 between two transports; returns (source, destination)."""
    n = SPEC.num_blocks_for(num_tokens)
    src, dst = filled_pool(), KVCache(SPEC, 16, torch.device("cpu"))
    receiving = make_transport("grpc", tls=receiver_tls)
    sending = make_transport("grpc", tls=sender_tls)
    try:
        info = await receiving.start_receiver("127.0.0.1", IDENTITY, dst, sink)
        session = sending.open_session(src, "model-a",
                                       KVTarget(info, tuple(DST_BLOCKS[:n]), num_tokens), "r1")
        for layer in range(SPEC.num_layers):
            session.post(range(layer, layer + 1), 0, SRC_BLOCKS[:n])
        await session.finish(Handoff("r1", [7]), timeout=10)
    finally:
        await sending.close()
        await receiving.close()
    return src, dst


def test_handoff_over_mutual_tls_lands_intact(pki):
    n = SPEC.num_blocks_for(100)
    sink = Sink({"r1": DST_BLOCKS[:n]})
    src, dst = asyncio.run(handoff(pki["cluster"], pki["cluster"], sink))
    assert sink.completed == [Handoff("r1", [7])]
    layers = range(SPEC.num_layers)
    assert same_bytes(dst.gather(layers, DST_BLOCKS[:n]), src.gather(layers, SRC_BLOCKS[:n]))


@pytest.mark.parametrize(("receiver", "sender"), [
    ("cluster", "plaintext"),
    ("cluster", "other-ca"),
    ("cluster", "cert-of-other-ca"),
    ("cluster", "no-client-cert"),
    ("plaintext", "cluster"),
])
def test_a_sender_on_other_terms_is_refused_at_once_naming_tls(pki, receiver, sender):
    sink = Sink({"r1": DST_BLOCKS[:1]})
    started = time.monotonic()
    with pytest.raises(TransferUnavailable, match="TLS") as err:
        asyncio.run(handoff(pki[receiver], pki[sender], sink, num_tokens=5))
    assert time.monotonic() - started < 5.0  # the handshake fails; no deadline is waited out
    assert err.value.retryable
    assert not sink.completed and not sink.arrivals


def test_certs_writes_a_ca_and_node_pair_and_never_replaces_the_ca(tmp_path):
    runner = CliRunner()
    made = runner.invoke(app, ["certs", str(tmp_path), "--host", "10.0.0.7"])
    assert made.exit_code == 0, made.output
    for name in ("ca.pem", "ca.key", "node.pem", "node.key"):
        assert str(tmp_path / name) in made.output
    assert "--tls-cert" in made.output and "worker.tls" in made.output
    assert (tmp_path / "node.key").stat().st_mode & 0o077 == 0
    ca = (tmp_path / "ca.pem").read_bytes()

    again = runner.invoke(app, ["certs", str(tmp_path)])
    assert again.exit_code == 2
    assert "ca.key exists" in again.output
    assert (tmp_path / "ca.pem").read_bytes() == ca
