"""Fault injection for tests: one environment variable, read once per process.

`TANDEM_FAULTS="transfer.delay=0.5,transfer.fail=0.1"` slows down or fails KV transfers and
worker steps. Unset (the default) every fault is off; production code has no other test branch.

    transfer.delay=S    sleep S seconds before each KV transfer
    transfer.fail=P     fail a KV transfer with probability P (as a network error)
    transfer.stall=P    stall a KV transfer for stall.s seconds with probability P
    transfer.corrupt=P  flip one payload byte in transit with probability P
    step.delay=S        sleep S seconds before each engine step on a worker
    step.fail=P         fail an engine step with probability P
    step.stall=P        stall an engine step for stall.s seconds with probability P
    store.delay=S       sleep S seconds before each KV store read (per tier)
    store.fail=P        fail a KV store read with probability P (as a tier error)
    store.stall=P       stall a KV store read for stall.s seconds with probability P
    stall.s=S           how long a stall lasts (default 2)
"""

from __future__ import annotations

import functools
import os
import random

from pydantic import BaseModel, ConfigDict, Field

ENV_VAR = "TANDEM_FAULTS"


class Faults(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    transfer_delay: float = Field(0.0, ge=0, description="Seconds of delay per KV transfer.")
    transfer_fail: float = Field(0.0, ge=0, le=1, description="Probability a transfer fails.")
    transfer_corrupt: float = Field(0.0, ge=0, le=1, description="Probability of a bit flip.")
    transfer_stall: float = Field(0.0, ge=0, le=1, description="Probability a transfer stalls.")
    step_delay: float = Field(0.0, ge=0, description="Seconds of delay per worker step.")
    step_fail: float = Field(0.0, ge=0, le=1, description="Probability a worker step fails.")
    step_stall: float = Field(0.0, ge=0, le=1, description="Probability a worker step stalls.")
    store_delay: float = Field(0.0, ge=0, description="Seconds of delay per store read.")
    store_fail: float = Field(0.0, ge=0, le=1, description="Probability a store read fails.")
    store_stall: float = Field(0.0, ge=0, le=1, description="Probability a store read stalls.")
    stall_s: float = Field(2.0, ge=0, description="Seconds a stall lasts.")

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """Parse `name=value` pairs separated by commas, e.g. `transfer.fail=0.1`."""
        values: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, value = item.partition("=")
            key = name.strip().replace(".", "_")
            if not sep or key not in cls.model_fields:
                known = ", ".join(k.replace("_", ".", 1) for k in cls.model_fields)
                raise ValueError(f"{ENV_VAR}: cannot parse {item!r}; expected NAME=VALUE with "
                                 f"NAME one of {known}")
            try:
                values[key] = float(value)
            except ValueError:
                raise ValueError(f"{ENV_VAR}: {name.strip()} needs a number, got {value!r}") \
                    from None
        return cls(**values)

    @staticmethod
    def hit(probability: float) -> bool:
        return probability > 0 and random.random() < probability

    def pause(self, delay: float, stall: float) -> float:
        """Seconds to hold one operation: its fixed delay, plus a stall if one is drawn."""
        return delay + (self.stall_s if self.hit(stall) else 0.0)


@functools.cache
def active_faults() -> Faults:
    """The faults this process was started with (`TANDEM_FAULTS`); all off when unset."""
    return Faults.parse(os.environ.get(ENV_VAR, ""))
