"""TLS settings and gRPC credentials for every hop, and development certificates.

Two kinds of hop:
- the public gateway (`GatewayTLS`): a server certificate, and optionally a CA whose client
  certificates it requires (mTLS);
- internal hops between workers (KV transfer, admin calls; `ClusterTLS`): mutual TLS under one
  cluster CA. Every node presents a certificate signed by that CA and accepts only peers that do.
  Node addresses are not known when certificates are made, so a peer's certificate is checked
  against one fixed cluster name (`server_name`, a SAN of every node certificate) rather than
  its address: identity is "signed by the cluster CA".

`make_dev_certs` (`tandem certs DIR`) writes a CA and a node certificate good for both roles, for
development and tests; production clusters bring their own (e.g. cert-manager).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
from pydantic import BaseModel, ConfigDict, Field, FilePath

CLUSTER_SERVER_NAME = "tandem-internal"


class GatewayTLS(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    cert: FilePath = Field(description="PEM certificate chain the gateway presents.")
    key: FilePath = Field(description="PEM private key of that certificate.")
    client_ca: FilePath | None = Field(
        None, description="PEM CA bundle: when set, clients must present a certificate it "
        "signed (mTLS).")

    def server_credentials(self) -> grpc.ServerCredentials:
        client_ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())], root_certificates=client_ca,
            require_client_auth=client_ca is not None)


class ClusterTLS(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    ca: FilePath = Field(description="PEM certificate of the cluster CA.")
    cert: FilePath = Field(description="This node's PEM certificate, signed by the CA.")
    key: FilePath = Field(description="Its PEM private key.")
    server_name: str = Field(
        CLUSTER_SERVER_NAME, description="The name every node certificate carries as a SAN; "
        "peers are checked against it instead of their address.")

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.ca.read_bytes(), require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(), private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes())

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)]


def make_dev_certs(directory: Path, hosts: list[str] | None = None, days: int = 365) \
        -> dict[str, Path]:
    """Write `ca.pem`/`ca.key` and `node.pem`/`node.key` (server and client use, SANs:
    localhost, 127.0.0.1, the cluster name and `hosts`) into `directory`; returns the paths.
    Refuses to overwrite an existing CA key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / name for name in ("ca.pem", "ca.key", "node.pem", "node.key")}
    if paths["ca.key"].exists():
        raise FileExistsError(f"{paths['ca.key']} exists: not overwriting a CA key")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tandem development CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    node_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(CLUSTER_SERVER_NAME)]
    for host in ["127.0.0.1", *(hosts or [])]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    node = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tandem node")]))
            .issuer_name(ca_name).public_key(node_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_format = (pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    paths["ca.pem"].write_bytes(ca.public_bytes(pem))
    paths["node.pem"].write_bytes(node.public_bytes(pem))
    for name, key in (("ca.key", ca_key), ("node.key", node_key)):
        paths[name].write_bytes(key.private_bytes(*key_format))
        paths[name].chmod(0o600)
    return paths
