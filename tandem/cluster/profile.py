"""`ReplicaProfile`: what one replica of each pool can do, measured (`tandem profile`) or cited.

The autoscaler sizes pools from it and the simulator runs on it, so it is plain data: a
versioned JSON document, pydantic-validated, with no torch or Ray. Curves are sampled points;
lookups interpolate linearly between them and hold the end values outside (a profile says
nothing past what was measured, so nothing is extrapolated).
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PROFILE_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PrefillPoint(_Strict):
    prompt_tokens: int = Field(gt=0)
    tokens_per_s: float = Field(gt=0, description="Prompt tokens prefilled per second.")


class DecodePoint(_Strict):
    batch: int = Field(gt=0)
    context: int = Field(gt=0, description="Tokens of KV per sequence.")
    step_s: float = Field(gt=0, description="One decode step of the whole batch, seconds.")


class ReplicaProfile(_Strict):
    version: Literal[1] = PROFILE_VERSION
    model: str
    device: str = Field(description="What one replica runs on, e.g. 'cpu:2' or 'H200'.")
    prefill: list[PrefillPoint] = Field(min_length=1)
    decode: list[DecodePoint] = Field(min_length=1)
    kv_capacity_tokens: int = Field(gt=0, description="KV tokens one decode replica holds.")
    attention_kv_capacity_tokens: int = Field(
        0, ge=0, description="KV tokens one attention replica holds (0: none profiled).")
    handoff_bytes_per_s: dict[str, float] = Field(
        default_factory=dict, description="KV handoff bandwidth per transport.")
    kv_bytes_per_token: int = Field(0, ge=0)
    store_hit_load_s_per_token: float = Field(
        0.0, ge=0, description="Time to load one cached prompt token's KV from the store.")
    startup_s: float = Field(60.0, ge=0, description="Start-up of a replica (model load).")
    layers: int = Field(0, ge=0, description="Model layers (offload: one round trip each).")
    offload_layer_rtt_s: float = Field(
        0.0, ge=0, description="Attention offload: one layer's round trip to the memory nodes.")
    attention_bytes_per_s: float = Field(
        0.0, ge=0, description="Attention offload: KV read bandwidth of one attention replica.")
    price_per_hour: dict[str, float] = Field(
        default_factory=dict, description="Price of one replica per hour, by pool role.")
    sources: dict[str, str] = Field(
        default_factory=dict, description="Where each field comes from (measured, or cited).")

    @model_validator(mode="after")
    def _sorted(self) -> ReplicaProfile:
        lengths = [p.prompt_tokens for p in self.prefill]
        if lengths != sorted(set(lengths)):
            raise ValueError("prefill: points must have increasing prompt_tokens")
        return self

    @classmethod
    def load(cls, path: Path) -> ReplicaProfile:
        try:
            return cls.model_validate(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(f"profile {path}: {e}") from None

    def prefill_tokens_per_s(self, prompt_tokens: float) -> float:
        xs = [p.prompt_tokens for p in self.prefill]
        ys = [p.tokens_per_s for p in self.prefill]
        return _interpolate(xs, ys, prompt_tokens)

    def decode_step_s(self, batch: float, context: float) -> float:
        """Step time at `batch` sequences of `context` tokens: linear in batch at each
        measured context, then linear in context between the two nearest measured ones."""
        contexts = sorted({p.context for p in self.decode})
        at = []
        for c in contexts:
            points = sorted((p.batch, p.step_s) for p in self.decode if p.context == c)
            at.append(_interpolate([b for b, _ in points], [s for _, s in points], batch))
        return _interpolate(contexts, at, context)

    def decode_capacity(self, context: float, itl_s: float) -> tuple[int, float]:
        """The largest batch one decode replica runs with steps of at most `itl_s` (and whose
        KV fits), and its output tokens per second; (0, 0.0) when not even one fits."""
        measured = max(p.batch for p in self.decode)  # nothing is claimed past it
        limit = max(1, min(measured, int(self.kv_capacity_tokens // max(context, 1))))
        best = (0, 0.0)
        for batch in _batches(limit):
            step = self.decode_step_s(batch, context)
            if step <= itl_s:
                best = (batch, batch / step)
        return best


def _batches(limit: int) -> list[int]:
    """Candidate batch sizes up to `limit`: every size to 64, then a geometric grid."""
    sizes = list(range(1, min(limit, 64) + 1))
    b = 64
    while b < limit:
        b = min(limit, int(b * 1.25) + 1)
        sizes.append(b)
    return sizes


def _interpolate(xs: list[float], ys: list[float], x: float) -> float:
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
