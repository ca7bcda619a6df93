"""KV handoff between processes: the transport interface and its implementations.

`--kv-transport` picks one: `nixl` (one-sided WRITEs, needs NIXL on both ends), `grpc` (a
stream; works everywhere) or `auto` (NIXL where both ends have it, else gRPC, with the reason
logged once).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Literal

from tandem.kv_store.codec import Codec
from tandem.transfer.base import KVTransport, ReceiverInfo
from tandem.transfer.coded_piece import AdaptiveCoding

if TYPE_CHECKING:
    from tandem.tls import ClusterTLS

logger = logging.getLogger(__name__)

TRANSPORTS = ("nixl", "grpc")
TransportMode = Literal["auto", "nixl", "grpc"]
NIXL_INSTALL = "pip install --no-deps nixl==1.5.1 nixl-cu13==1.5.1"


class TransportNotUsable(RuntimeError):
    """A configured KV transport cannot run here, or two workers share none (configuration,
    not the network: that is `TransferUnavailable`)."""


@functools.cache
def nixl_problem() -> str | None:
    """Why NIXL cannot be used in this process, or None when it can."""
    try:
        from tandem.transfer.nixl_transport import load_nixl

        load_nixl()
    except Exception as e:  # ImportError when missing; OSError and others when broken
        return f"NIXL is not usable here ({type(e).__name__}: {e}); install it with " \
               f"`{NIXL_INSTALL}` or use --kv-transport grpc"
    return None


def available_transports(mode: TransportMode, tls: bool = False) -> tuple[str, ...]:
    """The transports a worker runs for `mode`, best first; raises TransportNotUsable when
    `mode` names one this process lacks. Under `tls` (the cluster's mTLS), `auto` means gRPC:
    NIXL has no encryption, so it runs only when asked for by name (with a warning)."""
    if mode == "grpc" or (mode == "auto" and tls):
        return ("grpc",)
    problem = nixl_problem()
    if mode == "nixl":
        if problem:
            raise TransportNotUsable(f"--kv-transport nixl: {problem}")
        if tls:
            logger.warning("--kv-transport nixl with worker.tls: NIXL moves KV unencrypted "
                           "(RDMA, or UCX over TCP); only gRPC handoffs use the cluster's mTLS")
        return ("nixl",)
    return ("grpc",) if problem else ("nixl", "grpc")


def make_transport(name: str, codec: Codec | AdaptiveCoding | None = None,
                   tls: ClusterTLS | None = None, host: str | None = None) -> KVTransport:
    """The transport called `name` (see TRANSPORTS); needs a running event loop. `codec`
    codes the KV on the wire where the transport copies it (gRPC); NIXL writes raw blocks.
    `tls` secures gRPC streams (mutual TLS under the cluster CA; None = plaintext); NIXL has
    no TLS. `host` is the address this worker binds, if known: NIXL then keeps UCX's own
    listeners on loopback when it is a loopback address."""
    if name == "grpc":
        from tandem.transfer.grpc_transport import GrpcTransport

        return GrpcTransport(codec, tls)
    if name == "nixl":
        problem = nixl_problem()
        if problem:
            raise TransportNotUsable(problem)
        from tandem.transfer.nixl_transport import NixlTransport

        return NixlTransport(host)
    raise ValueError(f"kv_transport={name!r} is not one of {', '.join(TRANSPORTS)}")


def choose_receiver(local: tuple[str, ...], offered: tuple[ReceiverInfo, ...]) \
        -> tuple[ReceiverInfo, str | None]:
    """The best receiver both ends support, and why it is not the first choice (or None)."""
    by_name = {r.transport: r for r in offered}
    for name in local:
        if name in by_name:
            reason = None
            if name != local[0]:
                reason = f"the decode worker offers {', '.join(by_name)}, not {local[0]}"
            elif name != offered[0].transport:
                reason = f"{offered[0].transport} is not available on this worker " \
                         f"({nixl_problem() or 'not configured'})"
            return by_name[name], reason
    raise TransportNotUsable(f"no common KV transport: this worker has {', '.join(local)}, "
                               f"the decode worker offers {', '.join(by_name) or 'none'}")


@functools.cache
def log_fallback(reason: str) -> None:
    """Log why a handoff did not use the preferred transport, once per reason."""
    logger.warning("KV handoff falls back to gRPC: %s", reason)
