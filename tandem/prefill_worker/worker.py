"""`PrefillWorker`: compute a prompt and its first token while its KV streams to a decode worker.

A request's lifecycle here, as queues:
    waiting (in the engine's queue) -> prefilling (chunked, in the batch; layer-wise, each
    layer's KV is posted to the transport as soon as it is computed) -> prefilled (the first
    token is sampled; whatever was not sent yet is posted, on the engine thread) -> finishing
    (the transport waits for every WRITE, then the decode worker confirms) -> done.
The request's blocks stay held until its transfer is over, since the transport reads them in
place; whatever happens, they are freed when `prefill` returns or raises.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from tandem.engine.engine import LLMEngine
from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import SamplingParams
from tandem.prefill_worker.streamer import LayerStreamer
from tandem.transfer import TransportNotUsable, available_transports, make_transport
from tandem.transfer.base import Handoff, KVTarget, KVTransport, ReceiverInfo, SendSession
from tandem.worker_base import EngineWorker, WorkerConfig, WorkerInfo

logger = logging.getLogger(__name__)


class RequestAborted(Exception):
    """The request was aborted while it was on this worker."""


@dataclass(frozen=True)
class PrefillResult:
    output_token_ids: list[int]  # the first token
    num_cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    prefill_s: float  # arrival on this worker -> first token
    handoff_s: float  # first token -> the decode worker has the KV (the part not hidden)
    transport: str  # which transport carried the KV
    layerwise: bool  # whether the KV streamed layer by layer during the prefill


class PrefillWorker(EngineWorker):
    role = "prefill"

    def __init__(self, config: WorkerConfig, model_id: str) -> None:
        super().__init__(config, model_id)
        self.transports: dict[str, KVTransport] = {}
        self._streamers: dict[str, LayerStreamer] = {}  # read on the engine thread
        self._sessions: dict[str, SendSession] = {}
        self._computed_at: dict[str, float] = {}  # request -> when its first token was sampled
        self._cleanups: set[asyncio.Task] = set()

    async def start(self) -> WorkerInfo:
        names = available_transports(self.config.kv_transport)
        await super().start()
        self.transports = {name: make_transport(name) for name in names}
        self.kv_transports = names
        return self.info()

    def streams_layerwise(self, num_tokens: int) -> bool:
        mode = self.config.kv_streaming
        return mode == "layerwise" or (
            mode == "auto" and num_tokens >= self.config.layerwise_min_tokens)

    async def prefill(self, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams, receiver: ReceiverInfo,
                      block_ids: list[int]) -> PrefillResult:
        """Prefill and move the KV into `block_ids` of the decode worker at `receiver`."""
        started = time.perf_counter()
        engine, n = self._engine, len(prompt_token_ids)
        if receiver.transport not in self.transports:
            have = ", ".join(self.transports)
            raise TransportNotUsable(f"this prefill worker cannot send KV over "
                                       f"{receiver.transport} (it has {have})")
        stream = engine.open_stream(request_id)
        session: SendSession | None = None
        layerwise, handed_off = self.streams_layerwise(n), False
        try:
            session = self._sessions[request_id] = self.transports[receiver.transport] \
                .open_session(engine.engine.cache, engine.engine.fingerprint,
                              KVTarget(receiver, tuple(block_ids), n), request_id)
            streamer = self._streamers[request_id] = LayerStreamer(engine.engine, request_id, n,
                                                                   session)
            await engine.call(lambda e: e.add_request(
                request_id, prompt_token_ids, params, prefill_only=True,
                on_layer_kv=streamer if layerwise else None))
            item = await stream.get()
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason == "abort":
                raise RequestAborted(f"request {request_id} was aborted during prefill")
            prefilled = self._computed_at.pop(request_id, time.perf_counter())
            await session.finish(Handoff(request_id, item.token_ids),
                                 timeout=self.config.handoff_timeout_s)
            handed_off = True
            self.handoffs[f"{receiver.transport}/{'layerwise' if layerwise else 'onepiece'}"] += 1
            return PrefillResult(item.token_ids, item.num_cached_tokens, prefilled - started,
                                 time.perf_counter() - prefilled, receiver.transport, layerwise)
        finally:
            self._streamers.pop(request_id, None)
            self._computed_at.pop(request_id, None)
            engine.close_stream(request_id)
            if session is not None and not handed_off:  # the error goes out now; the blocks
                task = asyncio.get_running_loop().create_task(  # once no WRITE reads them
                    self._give_up(request_id, session))
                self._cleanups.add(task)
                task.add_done_callback(self._cleanups.discard)
            else:
                self._sessions.pop(request_id, None)
                await engine.call(lambda e: e.abort(request_id))  # frees the blocks

    async def _give_up(self, request_id: str, session: SendSession) -> None:
        try:
            await session.abort()  # waits (bounded) for WRITEs in flight
        finally:
            self._sessions.pop(request_id, None)
            await self._engine.call(lambda e: e.abort(request_id))

    def on_output(self, engine: LLMEngine, output: RequestOutput) -> RequestOutput:
        streamer = self._streamers.get(output.request_id)
        if streamer is not None and output.finish_reason != "abort":
            # The handoff's exposed time starts here, when compute ends, not when the event
            # loop gets to it: by then it may have copied much of the KV already.
            self._computed_at[output.request_id] = time.perf_counter()
            streamer.post_rest()  # before the next step can touch anything
        return output

    async def abort(self, request_id: str) -> bool:
        session = self._sessions.get(request_id)
        if session is not None:
            await session.abort()  # no more reads of the blocks before they are freed
        return await super().abort(request_id)

    def num_open_requests(self) -> int:
        return len(self._sessions)

    async def shutdown(self) -> None:
        for transport in self.transports.values():
            await transport.close()
        await super().shutdown()
