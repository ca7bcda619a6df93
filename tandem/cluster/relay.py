"""`TokenRelay`: the router's half that streams a placed request's tokens back.

It long-polls the decode worker (each poll with a deadline; each renews the worker's lease on
the request), watches the prefill for failure while the KV is on its way, fills in the first
token's logprobs from the prefill worker's result, and tells apart a lost worker (the request
can resume elsewhere) from other failures.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from ray.exceptions import RayActorError

from tandem.cluster.errors import ClusterError, WorkerUnavailable, message_of, translate
from tandem.cluster.routed import (
    AttentionLost,
    DecodeLost,
    Placement,
    PrefillLost,
    RequestMoving,
    RoutedRequest,
)
from tandem.decode_worker.migration import MIGRATED
from tandem.decode_worker.worker import TokenDelta
from tandem.engine.offload import KV_LOST
from tandem.prefill_worker.worker import PrefillResult
from tandem.transfer.errors import TransferUnavailable

logger = logging.getLogger(__name__)

POLL_S = 1.0  # one long-poll of a decode worker


class TokenRelay:
    colocated: bool
    call_timeout_s: float

    async def _relay(self, req: RoutedRequest, placed: Placement) -> AsyncIterator[TokenDelta]:
        while True:
            poll = asyncio.ensure_future(asyncio.wait_for(
                placed.decode.poll.remote(req.worker_id, POLL_S), POLL_S + self.call_timeout_s))
            waiting = {poll}
            if placed.prefill_task is not None and not placed.prefill_task.done():
                waiting.add(placed.prefill_task)
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if placed.prefill_task is not None and placed.prefill_task.done() \
                    and not placed.aborted:
                self._check_prefill(placed)
            try:
                deltas = await self._result(poll)
            except ClusterError as e:
                if placed.evicted:
                    raise DecodeLost("its decode worker is draining") from None
                if placed.aborted:  # the worker forgot it between two polls
                    yield TokenDelta([], "abort")
                    return
                if isinstance(e, WorkerUnavailable):
                    raise DecodeLost(str(e)) from None
                raise
            for delta in deltas:
                if delta.finish_reason == KV_LOST:  # an attention worker holding it is gone
                    if delta.token_ids:
                        yield replace(delta, finish_reason=None)
                    raise AttentionLost("an attention worker holding its KV was lost")
                if delta.finish_reason == MIGRATED:  # every token it made here came before
                    raise RequestMoving("its decode worker suspended it to move it")
                if placed.evicted and delta.finish_reason == "abort":  # moved, not ended
                    # Its tokens are not forwarded: the worker has forgotten what it sent, and
                    # the resumed request generates any unsent ones again, identically.
                    raise DecodeLost("its decode worker is draining")
                if delta.logprobs is not None and None in delta.logprobs:
                    delta = await self._with_first_logprobs(delta, placed)
                if delta.finish_reason is not None:
                    if self.colocated:
                        req.num_cached_tokens = delta.num_cached_tokens
                    else:
                        await self._prefill_result(placed)  # its timings end the stream
                yield delta
                if delta.finish_reason is not None:
                    return

    async def _with_first_logprobs(self, delta: TokenDelta, placed: Placement) -> TokenDelta:
        """`delta` with the logprobs of the tokens the prefill worker sampled (they travel
        with its result, which is due right after the handoff that produced this delta)."""
        result = await self._prefill_result(placed)
        first = list(result.output_logprobs or ()) if result is not None else []
        filled = [lp if lp is not None else (first.pop(0) if first else None)
                  for lp in delta.logprobs or ()]
        return replace(delta, logprobs=filled)

    async def _prefill_result(self, placed: Placement) -> PrefillResult | None:
        """The prefill worker's result, once the decode worker holds the KV; None if the
        request was aborted, or the prefill worker died after handing the KV over (the
        request goes on without its prefill timings)."""
        if placed.prefill_task is None or placed.aborted:
            return None
        try:
            return await self._result(placed.prefill_task)
        except WorkerUnavailable as e:
            logger.info("request %s: no prefill result (%s); the KV had arrived",
                        placed.worker_id, e)
            return None

    def _check_prefill(self, placed: Placement) -> None:
        assert placed.prefill_task is not None
        error = placed.prefill_task.exception()
        if error is None:
            return
        if isinstance(error, RayActorError):  # the prefill worker itself is gone
            raise PrefillLost(f"its prefill worker was lost ({message_of(error)})",
                              placed.prefill_index)
        if isinstance(error, TransferUnavailable):  # the decode worker's receiver is gone
            raise DecodeLost(f"its decode worker was lost ({message_of(error)})")
        raise translate(error)

    async def _result(self, future: Any) -> Any:
        try:
            return await future
        except Exception as e:
            raise translate(e) from None
