"""`SimConfig`: one simulated cluster and load, validated once, never mutated."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tandem.cluster.autoscaler import AutoscaleConfig, PoolsConfig, SLOConfig


class SimConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    layout: Literal["disaggregated", "colocated"] = Field(
        "disaggregated", description="Separate prefill and decode pools, or replicas that do "
        "both (chunked prefill mixed into decode steps; they form the decode pool).")
    prefill: int = Field(1, ge=0, description="Prefill replicas (the start when autoscaling).")
    decode: int = Field(1, ge=0, description="Decode (or colocated) replicas.")
    attention: int = Field(0, ge=0, description="Attention (memory) replicas.")
    offload: bool = Field(False, description="Decode attention runs on the attention pool.")
    autoscale: AutoscaleConfig = Field(default_factory=AutoscaleConfig)
    pools: PoolsConfig = Field(default_factory=lambda: PoolsConfig.model_validate(
        {"prefill": {"min": 1, "max": 4096}, "decode": {"min": 1, "max": 4096},
         "attention": {"min": 0, "max": 4096}}))
    slo: SLOConfig = Field(default_factory=SLOConfig)
    slice_s: float = Field(0.05, gt=0, le=0.05, description="Cohort mode's time slice.")
    cohort_s: float = Field(1.0, gt=0, description="Cohort mode: arrivals grouped per slice "
                            "of this many seconds (and per length bucket).")
    chunk_tokens: int = Field(512, gt=0, description="Colocated: prefill tokens per step.")
    transport: str = Field("nixl", description="The handoff transport (a profile key).")
    store_hit_rate: float = Field(0.0, ge=0, le=1, description="Share of prompt tokens whose "
                                  "KV the store already holds.")
    max_queue: int = Field(100_000, gt=0, description="Requests waiting with no replica to "
                           "take them; past it they fail.")
    drain_s: float = Field(900.0, ge=0, description="After the last arrival, time to finish; "
                           "what is unfinished then counts as failed.")
    sample_s: float = Field(10.0, gt=0, description="Timeline resolution, seconds.")
    seed: int = 0
