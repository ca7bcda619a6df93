"""The replica profile as vectorised time functions, shared by both engines."""

from __future__ import annotations

import numpy as np

from tandem.cluster.profile import ReplicaProfile
from tandem.sim.config import SimConfig


class Costs:
    """How long each piece of work takes on one replica, from a `ReplicaProfile`."""

    def __init__(self, profile: ReplicaProfile, config: SimConfig) -> None:
        self.profile = profile
        self.config = config
        self._prefill_x = np.array([p.prompt_tokens for p in profile.prefill], float)
        self._prefill_y = np.array([p.tokens_per_s for p in profile.prefill], float)
        self._contexts = np.array(sorted({p.context for p in profile.decode}), float)
        self._curves = []
        for c in self._contexts:
            points = sorted((p.batch, p.step_s) for p in profile.decode if p.context == c)
            self._curves.append((np.array([b for b, _ in points], float),
                                 np.array([s for _, s in points], float)))
        self.kv_capacity = float(profile.kv_capacity_tokens)
        # a replica runs at most the largest profiled batch (vLLM's max_num_seqs is 256 too)
        self.max_batch = float(max(p.batch for p in profile.decode))
        self.attention_capacity = float(profile.attention_kv_capacity_tokens)
        bandwidth = profile.handoff_bytes_per_s.get(config.transport)
        if bandwidth is None and profile.handoff_bytes_per_s:
            raise ValueError(f"transport {config.transport!r}: the profile has "
                             f"{sorted(profile.handoff_bytes_per_s)}")
        self._handoff_bw = bandwidth or 0.0
        if config.offload and not (profile.attention_kv_capacity_tokens and profile.layers
                                   and profile.attention_bytes_per_s):
            raise ValueError("offload: the profile lacks attention_kv_capacity_tokens, layers "
                             "or attention_bytes_per_s")

    def prefill_s(self, prompt: np.ndarray | float) -> np.ndarray:
        """Seconds to prefill `prompt` tokens (the store's hits are loaded, not computed)."""
        prompt = np.asarray(prompt, float)
        computed = prompt * (1.0 - self.config.store_hit_rate)
        rate = np.interp(prompt, self._prefill_x, self._prefill_y)
        loaded = prompt * self.config.store_hit_rate * self.profile.store_hit_load_s_per_token
        return computed / rate + loaded

    def handoff_s(self, prompt: np.ndarray | float) -> np.ndarray:
        """What layer-wise streaming leaves of the KV transfer after the prefill: the part
        that outruns the prefill, and at least the last layer's share."""
        prompt = np.asarray(prompt, float)
        if not self._handoff_bw:
            return np.zeros_like(prompt)
        transfer = prompt * self.profile.kv_bytes_per_token / self._handoff_bw
        last_layer = transfer / max(self.profile.layers, 1)
        return np.maximum(transfer - self.prefill_s(prompt), last_layer)

    def decode_step_s(self, batch: np.ndarray, context: np.ndarray,
                      kv_used: np.ndarray | None = None) -> np.ndarray:
        """One decode step of `batch` sequences of mean `context` tokens (0 where idle). With
        offload, the KV a replica holds past its own capacity (`kv_used`) lives on the
        attention pool, like `offload: auto`: the local step covers the rest, and the remote
        part adds a round trip per layer and the attention replicas' read of it."""
        batch = np.asarray(batch, float)
        context = np.asarray(context, float)
        if not self.config.offload or kv_used is None:
            return np.where(batch > 0, self._local(batch, context), 0.0)
        kv_used = np.asarray(kv_used, float)
        with np.errstate(divide="ignore", invalid="ignore"):
            remote = np.where(kv_used > self.kv_capacity,
                              (kv_used - self.kv_capacity) / kv_used, 0.0)
        step = self._local(batch, context * (1 - remote))
        read = batch * context * remote * self.profile.kv_bytes_per_token / (
            self.profile.attention_bytes_per_s * max(self.attention_share, 1e-9))
        trips = np.where(remote > 0, self.profile.layers * self.profile.offload_layer_rtt_s, 0.0)
        return np.where(batch > 0, step + trips + read, 0.0)

    def _local(self, batch: np.ndarray, context: np.ndarray) -> np.ndarray:
        at = np.stack([np.interp(batch, xs, ys) for xs, ys in self._curves])  # (contexts, n)
        if len(self._contexts) == 1:
            return at[0]
        c = np.clip(context, self._contexts[0], self._contexts[-1])
        i = np.clip(np.searchsorted(self._contexts, c, side="right"), 1, len(self._contexts) - 1)
        c0, c1 = self._contexts[i - 1], self._contexts[i]
        w = (c - c0) / (c1 - c0)
        cols = np.arange(batch.size)
        return at[i - 1, cols] * (1 - w) + at[i, cols] * w

    attention_share: float = 1.0  # attention replicas per decode replica (set by the engine)

    def decode_kv_capacity(self, attention_replicas: int, decode_replicas: int) -> float:
        """KV tokens one decode replica may hold: its own, and with offload its share of the
        attention pool's too."""
        if not self.config.offload:
            return self.kv_capacity
        return self.kv_capacity + self.attention_capacity * attention_replicas / max(
            decode_replicas, 1)

