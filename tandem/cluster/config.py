"""`ServeConfig`: everything `tandem serve` needs, from YAML and flags (flags win)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tandem.cluster.autoscaler import AutoscaleConfig, PoolsConfig, SLOConfig
from tandem.tls import GatewayTLS
from tandem.worker_base import WorkerConfig


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RebalanceConfig(_Strict):
    enabled: bool = Field(True, description="Move requests between decode workers to even "
                          "out their KV use (disaggregated mode).")
    high_water: float = Field(0.9, gt=0, le=1, description="KV use (share of blocks held) "
                              "past which a decode worker sheds a request.")
    low_water: float = Field(0.5, ge=0, lt=1, description="KV use under which a decode "
                             "worker takes one.")
    interval_s: float = Field(2.0, gt=0, description="How often the decode workers' KV use "
                              "is checked, seconds.")

    @model_validator(mode="after")
    def _marks_apart(self) -> RebalanceConfig:
        if self.low_water >= self.high_water:
            raise ValueError(f"rebalance.low_water ({self.low_water}) must be below "
                             f"high_water ({self.high_water})")
        return self


class GatewayConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address the public gRPC server binds.")
    port: int = Field(50051, ge=0, le=65535, description="Its port; 0 picks a free one.")
    http_port: int | None = Field(
        8000, ge=0, le=65535, description="Port of the OpenAI-compatible HTTP API (and "
        "/metrics, /health) on the same host; 0 picks a free one; None = no HTTP API.")
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins browsers may call the HTTP API from "
        "(CORS); empty = none.")
    max_queued_requests: int = Field(
        256, gt=0, description="Requests waiting for a worker before RESOURCE_EXHAUSTED.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Deadline of a request when the client sets none, seconds.")
    worker_call_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of one control call to a worker, seconds.")
    shutdown_grace_s: float = Field(
        5.0, ge=0, description="Time running requests get to finish on shutdown, seconds.")
    api_keys: list[str] = Field(
        default_factory=list, repr=False, description="Keys clients must send as "
        "'authorization: Bearer <key>' on every call (health and reflection stay open); a "
        "request can be aborted only with the key that made it. Empty = no authentication. "
        "Flags: --api-key (repeatable) or TANDEM_API_KEY (comma-separated).")
    tls: GatewayTLS | None = Field(
        None, description="Serve over TLS (and require client certificates when client_ca is "
        "set); None = plaintext.")
    debug_routing: bool = Field(
        False, description="Honour the x-tandem-prefill-worker metadata that pins a request "
        "to one prefill worker (tests and debugging only).")
    max_message_bytes: int = Field(
        4 << 20, gt=0, description="Largest gRPC message the gateway accepts or sends, bytes.")
    rebalance: RebalanceConfig = Field(default_factory=RebalanceConfig)


class RayConfig(_Strict):
    address: str | None = Field(
        None, description="Join this Ray cluster (e.g. 'auto' or 'HOST:6379'); None = local.")
    num_cpus: int | None = Field(
        None, gt=0, description="Logical CPUs of a local Ray cluster; None = all cores.")


class ServeConfig(_Strict):
    served_model_name: str | None = Field(
        None, description="Model id clients use; None = derived from the model path.")
    prefill_workers: int = Field(1, ge=1, description="Prefill pool size.")
    decode_workers: int = Field(1, ge=1, description="Decode pool size.")
    colocated: bool = Field(
        False, description="Workers run both phases (prefill_workers + decode_workers of them).")
    attention_workers: int = Field(
        0, ge=0, description="Attention pool size (memory-heavy nodes, Ray resource "
        "tandem_memory): they hold offloaded requests' KV by token range and run their "
        "attention, while decode workers run the dense layers (worker.offload). 0 = no offload.")
    follow_nodes: bool = Field(
        False, description="One worker on each Ray node that advertises a pool's resource, "
        "started when the node joins and forgotten when it leaves (Kubernetes: each pool pod "
        "is such a node and the operator sizes the pools); the pool sizes above are ignored.")
    worker: WorkerConfig = Field(default_factory=WorkerConfig, description="Every worker.")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    autoscale: AutoscaleConfig = Field(
        default_factory=AutoscaleConfig, description="The autoscaling policy "
        "(`cluster/autoscaler.py`); the operator's TandemCluster mirrors these keys.")
    pools: PoolsConfig = Field(default_factory=PoolsConfig,
                               description="Each pool's bounds under autoscaling.")
    slo: SLOConfig = Field(default_factory=SLOConfig,
                           description="The latency targets autoscaling holds.")

    @model_validator(mode="after")
    def _name(self) -> ServeConfig:
        if self.served_model_name == "":
            raise ValueError("served_model_name must not be empty")
        if self.colocated and self.attention_workers:
            raise ValueError("attention_workers needs disaggregated serving (colocated is set)")
        if self.autoscale.enabled:
            if self.follow_nodes:
                raise ValueError("autoscale.enabled: with follow_nodes the pools follow the "
                                 "nodes the operator scales; the operator runs the policy")
            if self.autoscale.profile is None:
                raise ValueError("autoscale.profile: autoscaling sizes pools from a replica "
                                 "profile; write one with `tandem profile`")
            sizes = {"prefill": self.prefill_workers, "decode": self.decode_workers,
                     "attention": self.attention_workers}
            if self.colocated:  # one pool, bounded by pools.decode
                sizes = {"decode": self.prefill_workers + self.decode_workers}
            for role, size in sizes.items():
                bounds = getattr(self.pools, role)
                if role == "attention" and bounds.max == 0:
                    continue  # not autoscaled: the pool keeps its size
                if bounds.min < 1:
                    raise ValueError(f"pools.{role}.min: serve --autoscale keeps at least one "
                                     "worker per pool (scale to zero is the simulator's)")
                if not bounds.min <= size <= bounds.max:
                    raise ValueError(f"pools.{role}: the starting size {size} is outside "
                                     f"[{bounds.min}, {bounds.max}]")
        return self

    @property
    def model_id(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        model = self.worker.engine.model
        return Path(model).stem if model else "smollm2-135m-instruct"

    @classmethod
    def load(cls, path: Path | None = None, overrides: dict[str, Any] | None = None) \
            -> ServeConfig:
        """The YAML file at `path` (if any) with `overrides` (dotted keys) on top."""
        data: dict[str, Any] = {}
        if path is not None:
            loaded = yaml.safe_load(Path(path).read_text())
            if loaded is not None and not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a mapping at the top level")
            data = loaded or {}
        for dotted, value in (overrides or {}).items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        return cls.model_validate(data)
