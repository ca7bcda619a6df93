"""The KV transport interface: how a prefill worker moves a request's KV into the blocks a
decode worker reserved for it.

Receiver (decode worker): `start_receiver(host, identity, cache, sink)` exposes its block pool
and returns a `ReceiverInfo` that travels to senders through the control path (Ray). KV is
written straight into the request's reserved blocks; the sink says which blocks those are and
adopts the request once every piece has arrived and checked out.

Sender (prefill worker): `open_session(cache, fingerprint, target, request_id)` returns a
`SendSession`. The engine thread `post`s pieces (layers x blocks of the sender's pool) as they
are computed; `finish(handoff, timeout)` waits until all of them landed and the receiver took
the request. Every transport (gRPC, NIXL) implements this and passes the same conformance tests.

Before its first piece, a sender whose transport has an `introduction()` (NIXL: its agent
metadata) hands it to the receiving worker through Ray, which passes it to `admit`; receivers
take such metadata from nowhere else.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from tandem.engine.kv_cache import KVCache, KVSpec
from tandem.faults import Faults, active_faults
from tandem.transfer.errors import TransferUnavailable


@dataclass(frozen=True)
class Handoff:
    """What completes a transfer: which request, and the tokens the prefill worker sampled."""

    request_id: str
    output_token_ids: list[int]
    # Leading prompt tokens whose KV is exact (None: all of it). KV past them (blended, or
    # decoded from a lossy code) must not enter the receiver's prefix cache.
    exact_tokens: int | None = None

    def limited_to(self, exact_tokens: int | None) -> Handoff:
        """This handoff with no more exact tokens than `exact_tokens` (None: no new limit)."""
        if exact_tokens is None:
            return self
        mine = exact_tokens if self.exact_tokens is None else min(self.exact_tokens,
                                                                   exact_tokens)
        return Handoff(self.request_id, self.output_token_ids, mine)


@dataclass(frozen=True)
class KVIdentity:
    """The model and layout a receiver accepts; anything else is rejected."""

    fingerprint: str
    spec: KVSpec
    max_tokens: int  # the receiver's context length: larger KV is refused before it is read


@dataclass(frozen=True)
class ReceiverInfo:
    """How senders reach one receiver; `blob` is transport-private (NIXL agent metadata)."""

    transport: str
    address: str
    blob: bytes = b""
    # The receiving worker's Ray actor handle (None outside Ray): senders introduce themselves
    # through it (`admit_kv_sender`), so what a receiver trusts comes through Ray only.
    control: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class KVTarget:
    """Where a request's KV goes: a receiver and the blocks reserved there, in order."""

    receiver: ReceiverInfo
    block_ids: tuple[int, ...]
    num_tokens: int


class KVSink(ABC):
    """The receiving worker's side of a transfer."""

    @abstractmethod
    def blocks_of(self, request_id: str) -> list[int] | None:
        """The blocks reserved for `request_id`, or None when it holds none (unknown, aborted,
        already adopted): its KV must not be written then."""

    def expecting(self) -> bool:
        """Whether KV may arrive soon (blocks are reserved): receivers then poll eagerly."""
        return False

    def kv_in_place(self, request_id: str) -> int:
        """Leading blocks of `request_id` whose KV an earlier, checked transfer already wrote
        (a migration's pre-copy): this transfer carries the rest. The default: none."""
        return 0

    def piece_arrived(self, request_id: str, layers: range) -> None:
        """A piece landed and checked out (for timing; the default ignores it)."""
        return None

    @abstractmethod
    async def complete(self, handoff: Handoff, num_tokens: int) -> None:
        """Every piece of `num_tokens` tokens of KV is in the blocks and checked: start the
        request. Raising TransferRejected (or ValueError) refuses it."""


class SendSession(ABC):
    """One request's transfer, on the sender. `post` is called from the engine thread."""

    @abstractmethod
    def post(self, layers: range, first_block: int, src_blocks: list[int]) -> None:
        """Send `layers` of the request's blocks [first_block, first_block + len(src_blocks)),
        which sit in the sender's pool at `src_blocks`. Their KV must stay put until `finish`
        or `abort` returns."""

    @abstractmethod
    async def finish(self, handoff: Handoff, timeout: float) -> None:
        """Wait (at most `timeout` s) for every posted piece to land, then hand the request
        over. Raises TransferUnavailable, TransferRejected or TransferCorrupted; then the
        caller must `abort` before it frees the source blocks."""

    @abstractmethod
    async def abort(self) -> None:
        """Stop: no more writes into the target, and tell the receiver so when possible."""


class KVTransport(ABC):
    name: str

    @abstractmethod
    async def start_receiver(self, host: str, identity: KVIdentity, cache: KVCache,
                             sink: KVSink) -> ReceiverInfo:
        """Start accepting KV into `cache` on `host`."""

    def reserved(self, request_id: str) -> None:
        """Blocks were just reserved for `request_id`: forget any earlier transfer under it."""
        return None

    def introduction(self) -> bytes:
        """What a receiver must be given through the control path (Ray) before this sender's
        first piece, or it ignores the sender (NIXL: this agent's name and metadata); b""
        when nothing is needed."""
        return b""

    @property
    def peer_id(self) -> str:
        """How peers know this end (NIXL: its agent name); "" when the transport has no such
        state (gRPC)."""
        return ""

    def forget_peers(self, peer_ids: set[str]) -> None:
        """Drop what is kept about peers that are gone (a worker that restarted comes back
        under a new id): NIXL unloads their agents. The default keeps nothing."""
        return None

    def known_peers(self) -> list[str]:
        """The peers whose state this transport keeps (NIXL: remote agents loaded)."""
        return []

    def admit(self, introduction: bytes) -> None:
        """Accept KV from the sender whose `introduction()` this is. Only for what came through
        the control path: a sender never gets admitted by what it says over the transport."""
        return None

    @abstractmethod
    async def settled(self, request_id: str, timeout: float) -> None:
        """Return once no sender can write into `request_id`'s blocks any more (after the
        sink stopped naming them), or after `timeout`. Blocks are freed only then."""

    @abstractmethod
    def open_session(self, cache: KVCache, fingerprint: str, target: KVTarget,
                     request_id: str) -> SendSession:
        """Start sending one request's KV from `cache` to `target`."""

    @abstractmethod
    async def close(self) -> None:
        """Stop the receiver and drop connections."""



async def apply_send_faults(request_id: str) -> None:
    """Injected transfer faults (TANDEM_FAULTS) when a handoff finishes: sleeps for
    transfer.delay (and transfer.stall), raises for transfer.fail."""
    faults = active_faults()
    pause = faults.pause(faults.transfer_delay, faults.transfer_stall)
    if pause:
        await asyncio.sleep(pause)
    if Faults.hit(faults.transfer_fail):
        raise TransferUnavailable(f"request {request_id}: injected transfer.fail")


def corrupts_transfer() -> bool:
    """Whether this transfer's first piece is damaged in transit (TANDEM_FAULTS)."""
    return Faults.hit(active_faults().transfer_corrupt)
