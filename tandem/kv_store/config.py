"""`StoreConfig`: which tiers a worker's KV store has, their sizes, and how it keys chunks."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from tandem.engine.kv_cache import KVSpec
from tandem.kv_store.codec import codec_for
from tandem.kv_store.errors import TierError
from tandem.kv_store.store import TieredStore
from tandem.kv_store.tiers.base import Tier
from tandem.kv_store.tiers.memory import MemoryTier
from tandem.kv_store.tiers.redis import RedisTier
from tandem.kv_store.tiers.ssd import SsdTier

logger = logging.getLogger(__name__)

GB = 2**30
# raw, or cachegen[:LEVEL] (LEVEL 0 = near-lossless ... 4 = most compact; default 1)
CodecName = Annotated[str, StringConstraints(pattern=r"^(raw|cachegen(:[0-4])?)$")]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RedisConfig(_Strict):
    url: str | None = Field(
        None, description="redis://HOST:PORT/DB (rediss:// for TLS) of the shared tier; None = "
        "an embedded redis-server when `embedded` and one is installed, else no Redis tier.")
    password: str | None = Field(None, description="AUTH password (kept out of logs).")
    ssl_ca_certs: str | None = Field(None, description="CA bundle to verify a rediss:// server.")
    embedded: bool = Field(
        True, description="Without a url, start a local redis-server for the cluster.")
    capacity_gb: float = Field(
        4.0, gt=0, description="maxmemory of the embedded server (an external server evicts "
        "by its own maxmemory and policy; use allkeys-lru).")
    timeout_s: float = Field(0.5, gt=0, description="Deadline of one Redis call, seconds.")
    part_mb: float = Field(4.0, gt=0, description="Objects are stored in parts of this size.")
    codec: CodecName = Field(
        "cachegen", description="How objects are coded in this tier: raw or cachegen[:LEVEL].")


class StoreConfig(_Strict):
    enabled: bool = Field(True, description="Reuse cached prefixes across requests and workers.")
    chunk_tokens: int = Field(
        256, gt=0, description="Tokens per stored prefix chunk (a multiple of the block size).")
    gpu_gb: float = Field(0.0, ge=0, description="GPU tier size, GiB (used only with CUDA).")
    cpu_gb: float = Field(2.0, ge=0, description="CPU tier size, GiB (pinned with CUDA).")
    ssd_gb: float = Field(8.0, ge=0, description="SSD tier size, GiB; 0 = no SSD tier.")
    ssd_dir: Path | None = Field(
        None, description="Directory of the SSD tier; None = $XDG_CACHE_HOME/tandem/kv "
        "(~/.cache/tandem/kv). Each worker uses its own subdirectory.")
    gpu_codec: CodecName = Field("raw", description="How objects are coded in the GPU tier.")
    cpu_codec: CodecName = Field("raw", description="How objects are coded in the CPU tier.")
    ssd_codec: CodecName = Field(
        "cachegen", description="How objects are coded in the SSD tier: raw or "
        "cachegen[:LEVEL] (CacheGen bitstreams; level 1 unless given).")
    redis: RedisConfig = Field(default_factory=RedisConfig)
    promote_on_hit: bool = Field(True, description="Copy a lower-tier hit into the first tier.")
    lookup_timeout_s: float = Field(
        2.0, gt=0, description="Time a prefill may spend loading cached chunks; past it, the "
        "rest of the prompt is computed.")
    max_pending_writes: int = Field(
        64, gt=0, description="Queued background writes before new ones are dropped.")

    @property
    def ssd_root(self) -> Path:
        if self.ssd_dir is not None:
            return self.ssd_dir
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(cache) / "tandem" / "kv"


def open_store(config: StoreConfig, fingerprint: str, spec: KVSpec, worker: str) \
        -> TieredStore | None:
    """The store a worker named `worker` uses, or None when disabled."""
    if not config.enabled:
        return None
    if config.chunk_tokens % spec.block_size:  # WorkerConfig checks this; direct users too
        raise ValueError(f"kv_store.chunk_tokens={config.chunk_tokens} must be a multiple of "
                         f"the engine's block size ({spec.block_size})")
    tiers: list[Tier] = []
    codecs: dict[str, str] = {}

    def codec(name: str) -> str:
        try:
            return codec_for(name, fingerprint).name
        except ValueError as e:  # e.g. no CacheGen profile for this model
            logger.warning("KV store: %s; storing raw KV instead", e)
            return "raw"

    if config.gpu_gb > 0:
        if torch.cuda.is_available():
            tiers.append(MemoryTier("gpu", int(config.gpu_gb * GB), "cuda"))
            codecs["gpu"] = codec(config.gpu_codec)
        else:
            logger.warning("kv_store.gpu_gb=%s ignored: no CUDA device", config.gpu_gb)
    if config.cpu_gb > 0:
        tiers.append(MemoryTier("cpu", int(config.cpu_gb * GB)))
        codecs["cpu"] = codec(config.cpu_codec)
    if config.ssd_gb > 0:
        try:
            tiers.append(SsdTier(config.ssd_root / worker, int(config.ssd_gb * GB)))
            codecs["ssd"] = codec(config.ssd_codec)
        except (OSError, TierError) as e:
            logger.warning("KV store: no SSD tier: %s", e)
    redis = config.redis
    if redis.url:
        tiers.append(RedisTier(redis.url, int(redis.capacity_gb * GB), password=redis.password,
                               ssl_ca_certs=redis.ssl_ca_certs, timeout_s=redis.timeout_s,
                               part_bytes=int(redis.part_mb * 2**20)))
        codecs["redis"] = codec(redis.codec)
    return TieredStore(tiers, fingerprint, spec, chunk_tokens=config.chunk_tokens,
                       codecs=codecs, promote_on_hit=config.promote_on_hit,
                       max_pending_writes=config.max_pending_writes)
