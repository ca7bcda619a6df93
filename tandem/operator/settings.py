"""The operator's own settings (`tandem operator` flags), validated once."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class OperatorSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    namespaces: list[str] = Field(default_factory=list,
                                  description="Namespaces watched; empty = every namespace.")
    gateway_http: str | None = Field(
        None, description="Every cluster's gateway HTTP base URL (metrics) instead of its "
        "Service's: an operator run outside the cluster.")
    gateway_grpc: str | None = Field(None, description="Likewise its gRPC address, HOST:PORT.")
    api_timeout_s: float = Field(10.0, gt=0, description="Deadline of one call to the API "
                                 "server or the gateway, seconds.")
    drain_timeout_s: float = Field(180.0, gt=0, description="Longest wait for a drained "
                                   "worker to hand its streams over, seconds.")
    startup_grace_s: float = Field(
        900.0, gt=0, description="How long a new cluster's gateway may stay unreachable "
        "before the cluster is marked Degraded (the model loads meanwhile), seconds.")
