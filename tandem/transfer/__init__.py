"""KV handoff between processes: the transport interface and its implementations."""

from __future__ import annotations

from tandem.transfer.base import KVTransport

TRANSPORTS = ("grpc",)


def make_transport(name: str) -> KVTransport:
    """The transport called `name` (see TRANSPORTS)."""
    if name == "grpc":
        from tandem.transfer.grpc_transport import GrpcTransport

        return GrpcTransport()
    raise ValueError(f"kv_transport={name!r} is not one of {', '.join(TRANSPORTS)}")
