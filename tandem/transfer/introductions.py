"""`Introductions`: a sender hands its introduction (NIXL: its agent metadata) to each receiving
worker through the control path (its Ray handle, `ReceiverInfo.control`) once, before its first
piece; receivers take such metadata from nowhere else, and ignore senders they were not
introduced to. Shared by every worker that sends KV (prefill workers; decode workers migrating
a request).
"""

from __future__ import annotations

import asyncio

from tandem.transfer.base import KVTransport, ReceiverInfo
from tandem.transfer.errors import TransferRejected, TransferUnavailable


class Introductions:
    def __init__(self, transports: dict[str, KVTransport], timeout_s: float) -> None:
        self.transports, self.timeout_s = transports, timeout_s
        self._done: dict[tuple[str, str], asyncio.Future] = {}  # (transport, receiver address)

    async def ensure(self, receiver: ReceiverInfo) -> None:
        """Return once `receiver` knows this worker as a sender over `receiver.transport`."""
        key = (receiver.transport, receiver.address)
        if key not in self._done:
            introduction = self.transports[receiver.transport].introduction()
            if not introduction:  # this transport needs none (gRPC)
                return
            if receiver.control is None:
                raise TransferRejected(f"the worker at {receiver.address} offers "
                                       f"{receiver.transport} without a Ray handle to introduce "
                                       "this worker through")
            self._done[key] = asyncio.ensure_future(asyncio.wait_for(
                receiver.control.admit_kv_sender.remote(receiver.transport, introduction),
                self.timeout_s))
            self._done[key].add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            await asyncio.shield(self._done[key])
        except Exception as e:
            self._done.pop(key, None)  # the next request tries again
            raise TransferUnavailable(f"could not introduce this worker to the worker at "
                                      f"{receiver.address} through Ray: {e}") from None

    def forget(self, addresses: set[str]) -> None:
        """Receivers that are gone (a restarted worker comes back under a new address)."""
        for key in [k for k in self._done if k[1] in addresses]:
            del self._done[key]
