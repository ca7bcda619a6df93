"""`PrefillWorker`: compute a prompt and its first token, then hand the KV to a decode worker.

A request's lifecycle here, as queues:
    waiting (in the engine's queue) -> prefilling (chunked, in the batch) -> exported (on the
    engine thread, right after the step that sampled the first token: the KV is copied out and
    the blocks freed, so the handoff never waits for the next step) -> sending (KV streams to
    the decode worker) -> done.
Whatever happens, the blocks are freed when `prefill` returns or raises.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tandem.engine.engine import LLMEngine
from tandem.engine.kv_cache import KVBlocks
from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import SamplingParams
from tandem.transfer import make_transport
from tandem.transfer.base import Handoff
from tandem.transfer.errors import TransferError
from tandem.worker_base import EngineWorker, WorkerConfig

logger = logging.getLogger(__name__)

HANDOFF_ATTEMPTS = 2


class RequestAborted(Exception):
    """The request was aborted while it was on this worker."""


@dataclass(frozen=True)
class Prefilled:
    output: RequestOutput
    kv: KVBlocks


@dataclass(frozen=True)
class PrefillResult:
    output_token_ids: list[int]  # the first token
    num_cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    prefill_s: float  # arrival on this worker -> first token
    handoff_s: float  # KV export + transfer, until the decode worker has it


class PrefillWorker(EngineWorker):
    role = "prefill"

    def __init__(self, config: WorkerConfig, model_id: str) -> None:
        super().__init__(config, model_id)
        self.transport = make_transport(config.kv_transport)
        self._open: set[str] = set()

    async def prefill(self, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams, kv_address: str) -> PrefillResult:
        """Prefill, then push the KV to the decode worker at `kv_address`."""
        engine = self._engine
        started = time.perf_counter()
        stream = engine.open_stream(request_id)
        self._open.add(request_id)
        item = None
        try:
            await engine.call(lambda e: e.add_request(
                request_id, prompt_token_ids, params, prefill_only=True))
            item = await stream.get()
            if isinstance(item, BaseException):
                raise item
            if not isinstance(item, Prefilled):
                raise RequestAborted(f"request {request_id} was aborted during prefill")
            prefilled = time.perf_counter()
            await self._hand_off(request_id, item, kv_address)
            return PrefillResult(item.output.token_ids, item.output.num_cached_tokens,
                                 prefilled - started, time.perf_counter() - prefilled)
        finally:
            self._open.discard(request_id)
            engine.close_stream(request_id)
            if not isinstance(item, Prefilled):  # failed or aborted before the export
                await engine.call(lambda e: e.abort(request_id))

    def on_output(self, engine: LLMEngine, output: RequestOutput) -> Prefilled:
        kv = engine.export_kv(output.request_id)
        engine.release(output.request_id)
        return Prefilled(output, kv)

    async def _hand_off(self, request_id: str, item: Prefilled, kv_address: str) -> None:
        handoff, kv = Handoff(request_id, item.output.token_ids), item.kv
        for attempt in range(1, HANDOFF_ATTEMPTS + 1):
            try:
                await self.transport.send(kv_address, handoff, kv, self._engine.engine.fingerprint,
                                          timeout=self.config.handoff_timeout_s)
                return
            except TransferError as e:
                if not e.retryable or attempt == HANDOFF_ATTEMPTS:
                    raise
                logger.warning("request %s: handoff attempt %d failed (%s); retrying",
                               request_id, attempt, e)

    def num_open_requests(self) -> int:
        return len(self._open)

    async def shutdown(self) -> None:
        await self.transport.close()
        await super().shutdown()
