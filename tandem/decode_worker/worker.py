"""`DecodeWorker`: continue requests prefilled elsewhere in one continuous batch.

A request's lifecycle here, as queues:
    reserved (blocks held for the prompt, KV on its way) -> receiving (the transport checks
    the KV) -> running (adopted into the batch with the prefill worker's first token) ->
    finished (blocks freed).
The gateway long-polls `poll` for token deltas; the first delta carries the first token, so the
client sees one stream. A colocated worker also takes whole requests (`generate`) and runs
both phases itself: the baseline that disaggregation is measured against.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from tandem.engine.engine import LLMEngine
from tandem.engine.errors import EngineError
from tandem.engine.kv_cache import KVBlocks
from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.sequence import SequenceStatus
from tandem.transfer import make_transport
from tandem.transfer.base import Handoff, KVIdentity
from tandem.transfer.errors import TransferRejected
from tandem.worker_base import EngineWorker, WorkerConfig, WorkerInfo, node_ip

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenDelta:
    token_ids: list[int]  # tokens generated since the previous delta
    finish_reason: str | None = None
    text: str | None = None  # the engine's final text (cut at a stop string), when finished
    num_cached_tokens: int = 0


class DecodeWorker(EngineWorker):
    role = "decode"

    def __init__(self, config: WorkerConfig, model_id: str) -> None:
        super().__init__(config, model_id)
        self.transport = make_transport(config.kv_transport)
        self._num_sent: dict[str, int] = {}  # request -> output tokens already polled

    async def start(self) -> WorkerInfo:
        await super().start()
        e = self._engine.engine
        identity = KVIdentity(e.fingerprint, e.kv_spec, e.max_model_len)
        self.kv_address = await self.transport.start_receiver(
            self.config.host or node_ip(), identity, self._accept)
        return self.info()

    async def reserve(self, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams) -> None:
        """Hold blocks for a prompt; raises OutOfBlocksError when too few are free."""
        await self._open(request_id, lambda e: e.reserve(request_id, prompt_token_ids, params))

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> None:
        """Colocated mode: prefill and decode here."""
        await self._open(request_id, lambda e: e.add_request(request_id, prompt_token_ids, params))

    async def _open(self, request_id: str, submit) -> None:
        self._engine.open_stream(request_id)
        self._num_sent[request_id] = 0
        try:
            await self._engine.call(submit)
        except BaseException:
            self.forget(request_id)
            raise

    async def _accept(self, handoff: Handoff, kv: KVBlocks) -> None:
        """The transport's sink: write checked KV into the reserved blocks and start decoding."""
        request_id = handoff.request_id

        def adopt_once(e: LLMEngine) -> RequestOutput | None:
            seq = e.seqs.get(request_id)
            if seq is not None and seq.status != SequenceStatus.RESERVED \
                    and seq.token_ids[seq.num_prompt_tokens:][:len(handoff.output_token_ids)] \
                    == handoff.output_token_ids:
                return None  # a retried handoff whose first attempt got through
            return e.adopt(request_id, kv, handoff.output_token_ids)

        try:
            await self._engine.call(adopt_once, publish_to=request_id)
        except EngineError as e:
            raise TransferRejected(str(e)) from None

    async def poll(self, request_id: str, timeout_s: float) -> list[TokenDelta]:
        """New tokens of a request, waiting up to `timeout_s` for the first; [] on timeout."""
        if request_id not in self._num_sent:
            raise EngineError(f"unknown request {request_id!r} on this decode worker")
        stream = self._engine.stream_of(request_id)
        try:
            items = [await asyncio.wait_for(stream.get(), timeout_s)]
        except TimeoutError:
            return []
        while not stream.empty():
            items.append(stream.get_nowait())
        deltas = []
        for item in items:
            if isinstance(item, BaseException):
                self.forget(request_id)
                raise item
            deltas.append(self._delta(item))
            if item.finished:
                self.forget(request_id)
                break
        return deltas

    def _delta(self, output: RequestOutput) -> TokenDelta:
        sent = self._num_sent.get(output.request_id, 0)
        self._num_sent[output.request_id] = len(output.token_ids)
        return TokenDelta(output.token_ids[sent:], output.finish_reason,
                          output.text if output.finished else None, output.num_cached_tokens)

    def forget(self, request_id: str) -> None:
        super().forget(request_id)
        self._num_sent.pop(request_id, None)

    def num_open_requests(self) -> int:
        return len(self._num_sent)

    async def shutdown(self) -> None:
        await self.transport.close()
        await super().shutdown()
