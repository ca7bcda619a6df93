"""The autoscaling policy: how many prefill, decode and attention replicas the load needs.

A pure function of what it is given (`decide`), so the in-head loop, the Kubernetes operator
and the simulator all run the same code; this module imports neither Ray nor torch.

Per interval:
1. Predict the next interval's load from the metrics window (`predictor`: the last sample,
   `constant`, or an exponential smoother, `ewma`).
2. Size each pool by throughput, like Dynamo's planner, from the replica profile:
   prefill = ceil(rate * ISL / prefill tok/s at ISL), decode = ceil(rate * OSL / the output
   tok/s of one replica at the largest batch whose step meets the ITL target), each corrected
   by the observed over the expected latency, clamped to [1/2, 2]: for decode the expected ITL
   is the profile's step at the batch each replica runs now (sequences in flight, by Little's
   law, over the ready replicas), so the correction measures the profile's error, not the
   load; for prefill the profile has no queueing to predict TTFT with (its
   service time alone would double every pool), so the expected TTFT is the target and the
   correction only grows the pool while the target is missed; attention = the KV that
   the decode pool cannot hold (Little's law: rate * decode time * mean context), in attention
   replicas' KV.
3. A load guard: a decode pool past `kv_high` KV use gets one more replica; a pool with more
   than `queue_per_replica` queued requests per replica also gets the replicas that clear its
   backlog (its prompt tokens at the profile's rate by the time new replicas have started, or
   its sequences at the ITL target's batch), through the same stabilisation as the rest.
4. Stabilise like Kubernetes' HPA: a scale-up takes the smallest recommendation of the last
   `scale_up_window_s`, a scale-down the largest of the last `scale_down_window_s`, so neither
   follows noise; then clamp to the pool's [min, max]. With min 0 a pool scales to zero when
   idle, and back to one as soon as a request arrives (requests queue meanwhile).
5. Pending replicas (started, not ready) count as no capacity: a pool short of ready replicas
   asks for what it lacks over the live pending ones, and a replica pending past
   `pending_timeout_s` is given up (the caller stops it) and no longer counted, so the policy
   never waits on a replica that will not come.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tandem.cluster.profile import ReplicaProfile

ROLES = ("prefill", "decode", "attention")
WINDOW = 6  # metrics samples the predictor sees (each caller keeps the last WINDOW)
CORRECTION_RANGE = (0.5, 2.0)


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AutoscaleConfig(_Strict):
    enabled: bool = Field(False, description="Resize the pools to the load (serve --autoscale).")
    profile: str | None = Field(
        None, description="Replica profile JSON (`tandem profile`) the pools are sized from.")
    interval_s: float = Field(10.0, gt=0, description="How often the policy runs, seconds.")
    scale_up_window_s: float = Field(
        0.0, ge=0, description="A scale-up needs every recommendation of this window above "
        "the current size (the smallest is taken), seconds.")
    scale_down_window_s: float = Field(
        60.0, ge=0, description="A scale-down takes the largest recommendation of this "
        "window, seconds.")
    scale_down_step: float = Field(
        0.02, gt=0, le=1, description="The largest share of a pool one scale-down removes "
        "(at least one replica), so capacity decays through a lull instead of dropping.")
    predictor: Literal["constant", "ewma"] = Field(
        "constant", description="Next interval's load: the last sample, or an exponential "
        "smoother over the window.")
    ewma_alpha: float = Field(0.5, gt=0, le=1, description="The smoother's weight of the "
                              "newest sample.")
    pending_timeout_s: float = Field(
        300.0, gt=0, description="A replica not ready this long after it was started is "
        "given up and stopped, seconds.")
    headroom: float = Field(
        1.2, ge=1, description="Capacity sized for this multiple of the predicted load, so "
        "bursts within a replica's start-up time are absorbed.")
    kv_high: float = Field(0.9, gt=0, le=1, description="Decode KV use that adds a replica.")
    queue_per_replica: float = Field(
        4.0, gt=0, description="Queued requests per replica that add one.")


class PoolBounds(_Strict):
    min: int = Field(1, ge=0, description="Fewest replicas; 0 lets the pool scale to zero.")
    max: int = Field(16, ge=0, description="Most replicas.")

    @model_validator(mode="after")
    def _ordered(self) -> PoolBounds:
        if self.min > self.max:
            raise ValueError(f"pool bounds: min ({self.min}) exceeds max ({self.max})")
        return self


class PoolsConfig(_Strict):
    prefill: PoolBounds = Field(default_factory=PoolBounds)
    decode: PoolBounds = Field(default_factory=PoolBounds)
    attention: PoolBounds = Field(default_factory=lambda: PoolBounds(min=0, max=0))


class SLOConfig(_Strict):
    ttft_s: float = Field(2.0, gt=0, description="Time-to-first-token target, seconds.")
    itl_s: float = Field(0.05, gt=0, description="Mean inter-token latency target, seconds.")
    percentile: float = Field(90.0, gt=0, le=100, description="The percentile held to them.")


@dataclass(frozen=True)
class LoadSample:
    """One interval's metrics, as the gateway exports them."""

    at: float  # seconds, any monotonic clock
    arrival_rate: float  # requests per second
    prompt_tokens_rate: float  # prompt tokens per second (uncached)
    output_tokens_rate: float
    queue_depth: dict[str, int] = field(default_factory=dict)  # role -> requests waiting
    ttft_s: float | None = None  # at the SLO percentile; None with no request
    itl_s: float | None = None
    kv_use: float = 0.0  # the decode pool's mean share of KV blocks in use


@dataclass(frozen=True)
class PoolState:
    ready: int
    pending_since: tuple[float, ...] = ()  # when each replica still starting was started


@dataclass(frozen=True)
class Decision:
    desired: dict[str, int]  # role -> replicas
    reasons: dict[str, str]  # role -> why, for logs, metrics and the operator's status
    give_up: dict[str, int] = field(default_factory=dict)  # role -> pending replicas to stop


@dataclass(frozen=True)
class PolicyMemory:
    """What the policy keeps between calls: recent raw recommendations per role."""

    history: dict[str, tuple[tuple[float, int], ...]] = field(default_factory=dict)
    smoothed: LoadSample | None = None
    first_seen: dict[str, tuple[float, int]] = field(default_factory=dict)  # (when, size)


def decide(window: list[LoadSample], profile: ReplicaProfile, slo: SLOConfig,
           config: AutoscaleConfig, pools: PoolsConfig, state: dict[str, PoolState],
           now: float, memory: PolicyMemory = PolicyMemory(),
           colocated: bool = False) -> tuple[Decision, PolicyMemory]:
    """The replicas each pool should have now, and the memory for the next call. With
    `colocated`, the decode pool's replicas do both phases: it is sized for the prefill and
    decode work together (stabilised as one pool: `state["decode"]`), and prefill gets 0."""
    if not window:
        raise ValueError("decide: the metrics window is empty")
    load, smoothed = _predict(window, config, memory.smoothed)
    if config.headroom != 1.0:
        load = replace(load, arrival_rate=load.arrival_rate * config.headroom,
                       prompt_tokens_rate=load.prompt_tokens_rate * config.headroom,
                       output_tokens_rate=load.output_tokens_rate * config.headroom)
    latest = window[-1]
    decode_ready = state.get("decode", PoolState(0)).ready
    raw = _throughput_sizes(load, latest, profile, slo, decode_ready)
    lengths = _mean_lengths(window, profile)
    if colocated:
        p_want, p_why = _guard("prefill", *raw["prefill"], latest, lengths, profile, slo,
                               config, decode_ready)
        d_want, d_why = raw["decode"]
        raw = {**raw, "prefill": (0, "colocated: the decode pool does both phases"),
               "decode": (p_want + d_want, f"prefill work {p_want} ({p_why}) + decode work "
                          f"{d_want} ({d_why})")}
    desired, reasons, give_up, history = {}, {}, {}, dict(memory.history)
    first_seen = dict(memory.first_seen)
    for role in ROLES:
        if colocated and role == "prefill":  # no such pool
            desired[role], reasons[role] = 0, raw[role][1]
            continue
        bounds = getattr(pools, role)
        pool = state.get(role, PoolState(0))
        live_pending = sum(1 for t in pool.pending_since if now - t < config.pending_timeout_s)
        if len(pool.pending_since) > live_pending:
            give_up[role] = len(pool.pending_since) - live_pending
        current = pool.ready + live_pending
        want, why = _guard(role, *raw[role], latest, lengths, profile, slo, config,
                           pool.ready)
        # A policy that has just started does not scale down before it has watched a whole
        # window: until then, the size it found counts as a recommendation for scale-downs.
        first_seen.setdefault(role, (now, current))
        recent = tuple((t, n) for t, n in history.get(role, ())
                       if now - t <= max(config.scale_up_window_s, config.scale_down_window_s))
        history[role] = (*recent, (now, want))
        target = _stabilised(history[role], first_seen[role], current, now, config)
        clamped = min(max(target, bounds.min), bounds.max)
        if clamped != target:
            why += f"; held to [{bounds.min}, {bounds.max}]"
        elif target != want:
            why += f"; stabilised at {target} (raw {want})"
        desired[role], reasons[role] = clamped, why
    return Decision(desired, reasons, give_up), PolicyMemory(history, smoothed, first_seen)


def _predict(window: list[LoadSample], config: AutoscaleConfig,
             previous: LoadSample | None) -> tuple[LoadSample, LoadSample | None]:
    latest = window[-1]
    if config.predictor == "constant":
        return latest, None
    a = config.ewma_alpha
    smoothed = previous
    for sample in window:
        if smoothed is not None and sample.at <= smoothed.at:
            continue  # already folded in
        smoothed = sample if smoothed is None else replace(
            sample,
            arrival_rate=a * sample.arrival_rate + (1 - a) * smoothed.arrival_rate,
            prompt_tokens_rate=a * sample.prompt_tokens_rate
            + (1 - a) * smoothed.prompt_tokens_rate,
            output_tokens_rate=a * sample.output_tokens_rate
            + (1 - a) * smoothed.output_tokens_rate)
    return smoothed or latest, smoothed


def _throughput_sizes(load: LoadSample, latest: LoadSample, profile: ReplicaProfile,
                      slo: SLOConfig, decode_ready: int) -> dict[str, tuple[int, str]]:
    if load.arrival_rate <= 0:
        idle = (0, "no requests arriving")
        return {role: idle for role in ROLES}
    isl = load.prompt_tokens_rate / load.arrival_rate
    osl = max(load.output_tokens_rate / load.arrival_rate, 1.0)
    prefill_rate = profile.prefill_tokens_per_s(isl)
    c_ttft = max(_correction(latest.ttft_s, slo.ttft_s), 1.0)
    prefill = math.ceil(load.prompt_tokens_rate / prefill_rate * c_ttft - 1e-9)
    context = isl + osl / 2  # a decoding sequence's mean KV
    batch, decode_rate = profile.decode_capacity(context, slo.itl_s)
    sizes = {"prefill": (max(prefill, 1), f"{load.prompt_tokens_rate:.0f} prompt tok/s at ISL "
                         f"{isl:.0f} / {prefill_rate:.0f} per replica x {c_ttft:.2f} (TTFT)")}
    if batch == 0:  # the ITL target is below one sequence's step: as many as the load
        concurrency = load.arrival_rate * osl * profile.decode_step_s(1, context)
        sizes["decode"] = (max(1, math.ceil(concurrency)),
                           f"no batch meets ITL {slo.itl_s * 1e3:.0f} ms; one sequence each")
    else:
        # like TTFT: the profile's step at the batch it sizes for already meets the target,
        # so the observed ITL only grows the pool while the target is missed (a p90 over the
        # profile's mean step would inflate every pool by the spread of the lengths)
        c_itl = max(_correction(latest.itl_s, slo.itl_s), 1.0)
        decode = math.ceil(load.output_tokens_rate / decode_rate * c_itl - 1e-9)
        sizes["decode"] = (max(decode, 1), f"{load.output_tokens_rate:.0f} output tok/s / "
                           f"{decode_rate:.0f} per replica (batch {batch} at ITL "
                           f"{slo.itl_s * 1e3:.0f} ms) x {c_itl:.2f} (ITL)")
    sizes["attention"] = _attention_size(load, osl, context, sizes["decode"][0], profile, slo)
    return sizes


def _attention_size(load: LoadSample, osl: float, context: float, decode: int,
                    profile: ReplicaProfile, slo: SLOConfig) -> tuple[int, str]:
    if not profile.attention_kv_capacity_tokens:
        return 0, "no attention replica in the profile"
    concurrency = load.arrival_rate * osl * slo.itl_s  # Little's law, at the ITL target
    overflow = concurrency * context - decode * profile.kv_capacity_tokens
    if overflow <= 0:
        return 0, "the decode pool holds the KV"
    n = math.ceil(overflow / profile.attention_kv_capacity_tokens)
    return n, f"{overflow:.0f} KV tokens past the decode pool's"


def _correction(observed: float | None, expected: float) -> float:
    if observed is None or expected <= 0:
        return 1.0
    low, high = CORRECTION_RANGE
    return min(max(observed / expected, low), high)


def _guard(role: str, want: int, why: str, latest: LoadSample, lengths: tuple[float, float],
           profile: ReplicaProfile, slo: SLOConfig, config: AutoscaleConfig,
           ready: int) -> tuple[int, str]:
    """More replicas when a pool is saturated, whatever the throughput says. A backlog past
    `queue_per_replica` per replica is sized by its work, on top of the replicas the arrivals
    need (doubling instead overshoots a burst many times over, and the stabilisation then
    holds the overshoot)."""
    queued = latest.queue_depth.get(role, 0)
    if ready == 0 and queued > 0:
        return max(want, 1), why + f"; {queued} queued with no replica"
    if queued > config.queue_per_replica * max(ready, 1):
        extra = _backlog_replicas(role, queued, lengths, profile, slo, config)
        if want + extra > want:
            return max(want + extra, ready + 1), why + f"; guard: {queued} queued (+{extra})"
    if role == "decode" and latest.kv_use >= config.kv_high:
        return max(want, ready + 1), why + f"; guard: KV use {latest.kv_use:.2f}"
    return want, why


def _backlog_replicas(role: str, queued: int, lengths: tuple[float, float],
                      profile: ReplicaProfile, slo: SLOConfig, config: AutoscaleConfig) -> int:
    """Replicas that clear `queued` requests: their prompt tokens at the profile's prefill
    rate by the time they have started, or their sequences at the ITL target's batch."""
    isl, osl = lengths
    if role == "prefill":
        # replicas started now serve after their start-up: sized to clear the backlog by then,
        # not within one interval (the existing ones work on it meanwhile; a burst that has
        # ended by then would leave the pool many times too big, held by the down window)
        work_s = queued * isl / profile.prefill_tokens_per_s(isl)
        return math.ceil(work_s / (config.interval_s + profile.startup_s))
    if role == "decode":
        batch, _ = profile.decode_capacity(isl + osl / 2, slo.itl_s)
        return math.ceil(queued / max(batch, 1))
    return 0


def _mean_lengths(window: list[LoadSample], profile: ReplicaProfile) -> tuple[float, float]:
    """Mean prompt and output lengths over the window (a backlog outlives the interval its
    requests arrived in); the profile's shortest prompt when nothing arrived."""
    arrivals = sum(s.arrival_rate for s in window)
    if arrivals <= 0:
        return float(profile.prefill[0].prompt_tokens), 1.0
    return (sum(s.prompt_tokens_rate for s in window) / arrivals,
            max(sum(s.output_tokens_rate for s in window) / arrivals, 1.0))


def _stabilised(history: tuple[tuple[float, int], ...], first_seen: tuple[float, int],
                current: int, now: float, config: AutoscaleConfig) -> int:
    up = [n for t, n in history if now - t <= config.scale_up_window_s]
    down = [n for t, n in (first_seen, *history) if now - t <= config.scale_down_window_s]
    if current == 0 and history[-1][1] > 0:  # requests wait on no replica: no delay
        return history[-1][1]
    if min(up) > current:
        return min(up)
    if max(down) < current:
        step = max(1, math.floor(current * config.scale_down_step))
        return max(max(down), current - step)
    return current
