"""What every engine-backed worker actor shares: its config, start-up, info, stats and abort.

Workers are plain classes; the cluster turns them into Ray actors (`ray.remote(...)`), so they
run their async methods on the actor's event loop and the engine on its own thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.kv_cache import KVSpec
from tandem.engine.loader import LoadedModel
from tandem.engine.outputs import EngineStats, RequestOutput
from tandem.engine.prompt_logprobs import prompt_logprobs
from tandem.engine.sampler import TokenLogprobs
from tandem.faults import Faults, active_faults
from tandem.kv_store.config import StoreConfig
from tandem.kv_store.stats import StoreStats
from tandem.kv_store.store import TieredStore
from tandem.log import setup_logging
from tandem.tls import ClusterTLS
from tandem.transfer import TransportMode
from tandem.transfer.base import KVTransport, ReceiverInfo
from tandem.transfer.introductions import Introductions
from tandem.worker_signals import drain_on_sigterm

logger = logging.getLogger(__name__)


class OffloadConfig(BaseModel):
    """Attention offload: which decoding requests keep their KV on attention workers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["auto", "always", "never"] = Field(
        "auto", description="always: every request decodes with its KV on attention workers; "
        "never: none does; auto: a request does when its prompt + max_tokens reaches "
        "min_tokens, or when no decode worker has blocks for it (only with attention "
        "workers).")
    min_tokens: int = Field(
        4096, gt=0, description="Under auto: the prompt + max_tokens from which a request is "
        "offloaded even when a decode worker has room.")
    attention_kv_blocks: int | None = Field(
        None, gt=0, description="KV blocks each attention worker holds; None = sized like a "
        "decode worker's pool (engine.num_kv_blocks, kv_cache_gb, or the default).")
    decode_kv_blocks: int | None = Field(
        None, gt=0, description="KV blocks of each decode worker's own pool, when it should "
        "differ from the prefill workers' (engine.num_kv_blocks); None = the same.")
    channel_timeout_s: float = Field(
        10.0, gt=0, description="Deadline of one reply on the attention channel, seconds: "
        "past it the attention worker counts as lost and its sequences resume elsewhere.")


class WorkerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: EngineConfig = Field(
        default_factory=lambda: EngineConfig(num_threads=1),
        description="The engine each worker runs (one torch thread by default).")
    kv_transport: TransportMode = Field(
        "auto", description="How prefill workers hand KV to decode workers: nixl (one-sided "
        "WRITEs into the decode worker's blocks), grpc (a stream), or auto (NIXL where both "
        "ends have it, else gRPC).")
    kv_streaming: Literal["auto", "layerwise", "onepiece"] = Field(
        "auto", description="Send each layer's KV while the next layers compute (layerwise), "
        "all of it after the prefill (onepiece), or layerwise from layerwise_min_tokens on.")
    layerwise_min_tokens: int = Field(
        512, gt=0, description="Shortest prompt that streams layer by layer under auto.")
    handoff_timeout_s: float = Field(
        30.0, gt=0, description="Deadline for a KV handoff after the prefill, seconds.")
    prefill_timeout_s: float = Field(
        600.0, gt=0, description="Deadline for a prefill on a prefill worker, queueing "
        "included, seconds.")
    lease_s: float = Field(
        30.0, gt=0, description="A decode worker frees a request's blocks (reserved, or "
        "holding unpolled outputs) when the gateway has not polled it for this long: the "
        "gateway polls at least every second while it waits, which renews the lease.")
    host: str | None = Field(
        None, description="Address the KV receiver binds; None = this node's IP.")
    tls: ClusterTLS | None = Field(
        None, description="Mutual TLS for internal gRPC hops (KV transfer, admin calls) under "
        "the cluster CA; None = plaintext, for one machine.")
    kv_codec: Annotated[str, StringConstraints(pattern=r"^(raw|cachegen(:([0-4]|auto))?)$")] \
        = Field("raw", description="How gRPC KV handoffs code the KV on the wire: raw, "
                "cachegen[:LEVEL], or cachegen:auto (per piece, the finest level that fits "
                "kv_codec_budget_s at the measured bandwidth). NIXL always writes raw blocks.")
    kv_codec_budget_s: float = Field(
        0.5, gt=0, description="Under kv_codec cachegen:auto: the time a handoff's KV may take "
        "on the wire, seconds.")
    kv_store: StoreConfig = Field(
        default_factory=StoreConfig, description="Prefill workers' tiered KV store (prefix "
        "reuse across requests and workers).")
    offload: OffloadConfig = Field(
        default_factory=OffloadConfig, description="Attention offload to attention workers "
        "(serve --attention-workers N).")

    @model_validator(mode="after")
    def _chunks_are_whole_blocks(self) -> WorkerConfig:
        chunk, block = self.kv_store.chunk_tokens, self.engine.block_size
        if chunk % block:
            raise ValueError(f"kv_store.chunk_tokens ({chunk}) must be a multiple of "
                             f"engine.block_size ({block})")
        return self


@dataclass(frozen=True)
class WorkerInfo:
    role: str
    model_id: str
    fingerprint: str
    max_model_len: int
    kv_spec: KVSpec
    kv_receivers: tuple[ReceiverInfo, ...]  # how senders reach this worker (decode workers)
    kv_transports: tuple[str, ...]  # what this worker sends KV with (prefill workers), best first
    node: str = ""  # the node's IP address
    pod: str = ""  # the Kubernetes pod (POD_NAME, from the downward API); "" elsewhere
    pid: int = 0  # the worker's process id on its node
    kv_peer_ids: tuple[str, ...] = ()  # how KV peers know it (NIXL agent names)
    channel: str = ""  # an attention worker's attention channel, "host:port"


@dataclass(frozen=True)
class WorkerStats:
    engine: EngineStats
    num_open_requests: int  # requests this worker still tracks (streams not yet drained)
    handoffs: dict[str, int] = field(default_factory=dict)  # "nixl/layerwise" -> count sent
    kv_store: StoreStats | None = None  # prefill workers with a KV store
    kv_codec_choices: dict[str, int] = field(default_factory=dict)  # cachegen:auto: level -> n
    handoff_bytes: int = 0  # KV block bytes handed over (prefill workers)
    handoff_s: float = 0.0  # their exposed handoff time
    control_calls: dict[str, int] = field(default_factory=dict)  # "stats"/"reserve" -> calls
    rss_bytes: int = 0  # this process's resident memory (0 where /proc is missing)
    drain_requested: bool = False  # it got a SIGTERM: the pool manager drains it
    attention: Any = None  # an attention worker's `AttentionStats`
    offload: Any = None  # a decode worker's `OffloadStats` (attention offload)
    # A prefill worker's chunk-cache reuse (`ChunkReuseSnapshot`): totals and the top chunks
    chunk_reuse: Any = None


class WorkerStepError(RuntimeError):
    """An engine step failed on a worker; the requests in it were aborted."""


def inject_step_faults() -> None:
    faults = active_faults()
    pause = faults.pause(faults.step_delay, faults.step_stall)
    if pause:
        time.sleep(pause)
    if Faults.hit(faults.step_fail):
        raise WorkerStepError("injected fault: step.fail")


def resident_bytes() -> int:
    """This process's resident set size, from /proc (0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (unit tests): loopback
        return socket.gethostbyname("localhost")


def own_actor() -> Any:
    """This worker's Ray actor handle, or None when it is not running as an actor."""
    try:
        import ray

        if not ray.is_initialized():  # asking would start a local Ray instance
            return None
        return ray.get_runtime_context().current_actor
    except Exception:  # outside Ray, or Ray without an actor here (unit tests, benchmarks)
        return None


class EngineWorker:
    role = "worker"

    def __init__(self, config: WorkerConfig, model_id: str,
                 loaded: LoadedModel | None = None) -> None:
        self.config, self.model_id = config, model_id
        self.loaded = loaded  # weights shared with other engines in this process (tests)
        self.engine: AsyncEngine | None = None
        self.kv_receivers: tuple[ReceiverInfo, ...] = ()
        self.kv_transports: tuple[str, ...] = ()
        self.handoffs: Counter[str] = Counter()
        self.handoff_bytes, self.handoff_s = 0, 0.0
        self.calls: Counter[str] = Counter()  # control calls received, by name
        self.store: TieredStore | None = None
        self.introductions: Introductions | None = None  # workers that send KV
        self.drain_requested = False  # set by SIGTERM (`worker_signals`)

    def engine_config(self) -> EngineConfig:
        return self.config.engine

    async def start(self) -> WorkerInfo:
        """Load the model (seconds) and start the engine thread; returns what routers need."""
        setup_logging()
        drain_on_sigterm(self._request_drain)
        engine = await asyncio.to_thread(LLMEngine, self.engine_config(), self.loaded)
        self.engine = AsyncEngine(engine, before_step=inject_step_faults,
                                  on_output=self.on_output)
        return self.info()

    def _request_drain(self) -> None:
        self.drain_requested = True  # runs in a signal handler: state only

    def on_output(self, engine: LLMEngine, output: RequestOutput) -> Any:
        """Runs on the engine thread after each step; the result goes on the request's stream."""
        return output

    def info(self) -> WorkerInfo:
        e = self._engine.engine
        return WorkerInfo(self.role, self.model_id, e.fingerprint, e.max_model_len, e.kv_spec,
                          self.kv_receivers, self.kv_transports, node_ip(),
                          os.environ.get("POD_NAME", ""), os.getpid(),
                          tuple(t.peer_id for t in self.kv_transport_objects() if t.peer_id))

    def kv_transport_objects(self) -> list[KVTransport]:
        return []

    async def forget_kv_peers(self, peer_ids: list[str]) -> None:
        """Workers that are gone (replaced, removed, dead): drop what the transports keep
        about them (NIXL: their agents), so a restarted peer starts afresh."""
        gone = set(peer_ids)
        for transport in self.kv_transport_objects():
            transport.forget_peers(gone)
        if self.introductions is not None:
            self.introductions.forget(gone)

    async def known_kv_peers(self) -> list[str]:
        return sorted({p for t in self.kv_transport_objects() for p in t.known_peers()})

    @property
    def _engine(self) -> AsyncEngine:
        if self.engine is None:
            raise RuntimeError(f"{self.role} worker used before start()")
        return self.engine

    async def stats(self) -> WorkerStats:
        self.calls["stats"] += 1
        return WorkerStats(await self._engine.call(LLMEngine.stats), self.num_open_requests(),
                           dict(self.handoffs), self.store.stats() if self.store else None,
                           self.codec_choices(), self.handoff_bytes, self.handoff_s,
                           dict(self.calls), resident_bytes(), self.drain_requested,
                           offload=await self.offload_stats(),
                           chunk_reuse=self.chunk_reuse_stats())

    def chunk_reuse_stats(self) -> Any:
        """A prefill worker's `ChunkReuseSnapshot` (chunk caches, variants); None elsewhere."""
        return None

    async def offload_stats(self) -> Any:
        """A decode worker's attention-offload figures (`OffloadStats`); None elsewhere."""
        return None

    async def prompt_logprobs(self, token_ids: list[int], top_n: int) -> list[TokenLogprobs]:
        """The raw logprobs of a prompt's tokens (from its second), each with its top_n."""
        return await self._engine.call(lambda e: prompt_logprobs(e, token_ids, top_n))

    def num_open_requests(self) -> int:
        return 0

    def codec_choices(self) -> dict[str, int]:
        return {}

    async def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; wakes anyone waiting on its outputs."""
        output = await self._engine.call(lambda e: e.abort(request_id), publish_to=request_id)
        self.forget(request_id)
        return output is not None

    def forget(self, request_id: str) -> None:
        self._engine.close_stream(request_id)

    async def shutdown(self) -> None:
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        if self.engine is not None:
            await self.engine.close()
