"""The KV transport interface: how a prefill worker hands a request's KV to a decode worker.

A receiver is started with the identity of the KV it accepts and a sink that takes each
request's checked KV (the decode worker writes it into the request's reserved blocks). Senders
address receivers by the string the receiver returned from `start_receiver`. Every transport
(gRPC now, NIXL next) implements this and passes the same conformance tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tandem.engine.kv_cache import KVBlocks, KVSpec


@dataclass(frozen=True)
class Handoff:
    """What travels with the KV: which request, and the tokens the prefill worker sampled."""

    request_id: str
    output_token_ids: list[int]


@dataclass(frozen=True)
class KVIdentity:
    """The model and layout a receiver accepts; anything else is rejected."""

    fingerprint: str
    spec: KVSpec
    max_tokens: int  # the receiver's context length: larger KV is refused before it is read


# Takes a checked handoff; raising TransferRejected (or ValueError) refuses it.
KVSink = Callable[[Handoff, KVBlocks], Awaitable[None]]


class KVTransport(ABC):
    name: str

    @abstractmethod
    async def start_receiver(self, host: str, identity: KVIdentity, sink: KVSink) -> str:
        """Start accepting KV on `host`; returns the address senders use."""

    @abstractmethod
    async def send(self, address: str, handoff: Handoff, kv: KVBlocks, fingerprint: str,
                   timeout: float) -> None:
        """Deliver `kv` to the receiver at `address`; returns once the sink has taken it.

        Raises TransferUnavailable (may retry) or TransferRejected (do not retry)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop the receiver and drop connections."""
