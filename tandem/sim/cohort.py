"""Cohort mode: pieces of a few like requests, every replica advanced together in time slices
of at most 50 ms, with numpy across replicas and pieces.

Per slice: arriving pieces are routed (to the least-loaded prefill replicas, round robin over
them in load order); each prefill replica works its FIFO queue for the slice; finished pieces
hand off (or, colocated, join their replica's batch); waiting pieces join the decode replicas
with the most free KV; every decode replica runs slice / step-time steps, its step time from
its batch and mean context. Colocated replicas mix a chunk of prefill into each step.
"""

from __future__ import annotations

import numpy as np

from tandem.sim.cohorts import Pieces
from tandem.sim.costs import Costs
from tandem.sim.fleet import Fleet

_I = np.int64


def _grouped_before(groups: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For rows sorted by group: the sum of `values` of the group's earlier rows."""
    cum = np.cumsum(values) - values
    first = np.r_[True, groups[1:] != groups[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(groups.size), 0))
    return cum - cum[start]


class CohortEngine:
    def __init__(self, pieces: Pieces, costs: Costs, fleet: Fleet, ledger, config) -> None:
        self.p, self.costs, self.fleet, self.ledger, self.config = (
            pieces, costs, fleet, ledger, config)
        self.colocated = config.layout == "colocated"
        self.dt = config.slice_s
        self.work = costs.prefill_s(pieces.prompt) * pieces.count  # the piece's prefill
        self.handoff = costs.handoff_s(pieces.prompt)
        self.need = (pieces.prompt + pieces.output) * pieces.count  # KV reserved
        self.first_lo = np.full(len(pieces), np.nan)
        self.first_hi = np.full(len(pieces), np.nan)
        self.next_piece = 0  # pieces before it have been released
        self.attention = 0
        self.kv_used = np.zeros(0)  # per decode replica
        self.queued = np.zeros(0)  # per prefill-doing replica: prefill work waiting, seconds
        self.busy_share = np.zeros(0)
        self.waiting_prefill = np.zeros(0, _I)  # released pieces with no replica yet
        self.q_piece, self.q_rep, self.q_left = np.zeros(0, _I), np.zeros(0, _I), np.zeros(0)
        self.w_piece, self.w_ready = np.zeros(0, _I), np.zeros(0)  # handed off, no KV yet
        self.d_piece, self.d_rep = np.zeros(0, _I), np.zeros(0, _I)
        self.d_context, self.d_left = np.zeros(0), np.zeros(0)
        self.accounted = 0.0
        self.draining: set[tuple[str, int]] = set()

    @property
    def prefill_role(self) -> str:
        return "decode" if self.colocated else "prefill"

    # -- one slice -----------------------------------------------------------------------------
    def advance(self, t: float) -> None:
        self._release(t)
        step, chunk = self._decode_step_times(t)
        if self.colocated:
            with np.errstate(divide="ignore", invalid="ignore"):
                budget = np.where(step > 0, self.dt / step * chunk, 0.0)
        else:
            budget = np.full(self.queued.size, self.dt)
        self._prefill(t, budget)
        if not self.colocated:
            self._admit(t)
        self._decode(t, step)
        self._stop_drained(t)

    def _release(self, t: float) -> None:
        end = int(np.searchsorted(self.p.arrival, t + self.dt, side="left"))
        new = np.arange(self.next_piece, end, dtype=_I)
        self.next_piece = end
        waiting = np.concatenate([self.waiting_prefill, new])
        if not waiting.size:
            return
        ready = np.array(self.fleet.ready(self.prefill_role, t), _I)
        if not ready.size:
            over = np.cumsum(self.p.count[waiting]) > self.config.max_queue
            for piece in waiting[over]:
                self._fail(piece)
            self.waiting_prefill = waiting[~over]
            return
        by_load = ready[np.argsort(self.queued[ready], kind="stable")]
        rep = by_load[np.arange(waiting.size) % by_load.size]
        if self.colocated:  # KV is reserved as the piece is routed
            fits = _grouped_fit(rep, self.need[waiting],
                                self._capacity(t) - self.kv_used[rep])
            too_big = self.need[waiting] > self._capacity(t)
            for piece in waiting[too_big]:
                self._fail(piece)
            fits &= ~too_big
            self.kv_used += np.bincount(rep[fits], self.need[waiting][fits],
                                        self.kv_used.size)
            self.waiting_prefill = waiting[~fits & ~too_big]
            waiting, rep = waiting[fits], rep[fits]
        else:
            self.waiting_prefill = np.zeros(0, _I)
        self.q_piece = np.concatenate([self.q_piece, waiting])
        self.q_rep = np.concatenate([self.q_rep, rep])
        self.q_left = np.concatenate([self.q_left, self.work[waiting]])
        self.queued += np.bincount(rep, self.work[waiting], self.queued.size)

    def _prefill(self, t: float, budget: np.ndarray) -> None:
        self.busy_share = np.zeros(self.queued.size)
        if not self.q_piece.size:
            return
        order = np.argsort(self.q_rep, kind="stable")
        rep, left, piece = self.q_rep[order], self.q_left[order], self.q_piece[order]
        before = _grouped_before(rep, left)
        b = budget[rep]
        done = (before + left <= b) & (b > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            stretch = np.where(b > 0, self.dt / b, 0.0)  # wall seconds per second of work
        finish = t + (before + left) * stretch
        spent = np.clip(b - before, 0.0, left)
        self.queued -= np.bincount(rep, spent, self.queued.size)
        self.busy_share = np.minimum(np.bincount(rep, spent, self.queued.size) / self.dt, 1.0)
        self.q_piece, self.q_rep, self.q_left = piece[~done], rep[~done], (left - spent)[~done]
        if done.any():
            self._prefilled(piece[done], rep[done], finish[done], stretch[done])

    def _prefilled(self, piece: np.ndarray, rep: np.ndarray, finish: np.ndarray,
                   stretch: np.ndarray) -> None:
        count = self.p.count[piece]
        span = self.work[piece] * stretch * (count - 1) / count
        self.first_lo[piece], self.first_hi[piece] = finish - span, finish
        one = self.p.output[piece] <= 1
        for k in np.flatnonzero(one):
            self._finish(piece[k], finish[k])
            if self.colocated:
                self.kv_used[rep[k]] -= self.need[piece[k]]
        piece, rep, finish = piece[~one], rep[~one], finish[~one]
        if self.colocated:
            self._join(piece, rep)
        else:
            self.w_piece = np.concatenate([self.w_piece, piece])
            self.w_ready = np.concatenate([self.w_ready, finish + self.handoff[piece]])

    def _admit(self, t: float) -> None:
        eligible = self.w_ready <= t
        if not eligible.any():
            return
        ready = np.array(self.fleet.ready("decode", t), _I)
        if not ready.size:
            return
        capacity = self._capacity(t)
        piece = self.w_piece[eligible]
        too_big = self.need[piece] / self.p.count[piece] > capacity
        for k in piece[too_big]:
            self._fail(k)
        by_free = ready[np.argsort(self.kv_used[ready], kind="stable")]
        rep = by_free[np.arange(piece.size) % by_free.size]
        fits = _grouped_fit(rep, self.need[piece], capacity - self.kv_used[rep]) & ~too_big
        fits &= _grouped_fit(rep, self.p.count[piece], self._slots()[rep])
        self.kv_used += np.bincount(rep[fits], self.need[piece][fits], self.kv_used.size)
        self._join(piece[fits], rep[fits])
        keep = np.ones(self.w_piece.size, bool)
        keep[np.flatnonzero(eligible)[fits | too_big]] = False
        self.w_piece, self.w_ready = self.w_piece[keep], self.w_ready[keep]

    def _slots(self) -> np.ndarray:
        """Per decode replica, sequences it may still take (the batch cap)."""
        batch = np.bincount(self.d_rep, self.p.count[self.d_piece], self.kv_used.size)
        return self.costs.max_batch - batch

    def _join(self, piece: np.ndarray, rep: np.ndarray) -> None:
        self.d_piece = np.concatenate([self.d_piece, piece])
        self.d_rep = np.concatenate([self.d_rep, rep])
        self.d_context = np.concatenate([self.d_context, self.p.prompt[piece] + 1.0])
        self.d_left = np.concatenate([self.d_left, self.p.output[piece] - 1.0])

    def _decode_step_times(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Per decode replica: its step time now, and (colocated) the prefill work per step."""
        n = self.kv_used.size
        count = self.p.count[self.d_piece]
        batch = np.bincount(self.d_rep, count, n)
        with np.errstate(divide="ignore", invalid="ignore"):
            context = np.where(batch > 0, np.bincount(self.d_rep, count * self.d_context, n)
                               / batch, 0.0)
        self._refresh_share(t)
        step = self.costs.decode_step_s(batch, context, self.kv_used) if n else np.zeros(0)
        chunk = np.zeros(n)
        if self.colocated and self.q_piece.size:
            tokens = np.bincount(self.q_rep, self.q_left / self.work[self.q_piece]
                                 * self.p.prompt[self.q_piece] * self.p.count[self.q_piece], n)
            with np.errstate(divide="ignore", invalid="ignore"):
                per_token = np.where(tokens > 0, self.queued / tokens, 0.0)
            chunk = np.minimum(self.queued, self.config.chunk_tokens * per_token)
            step = step + chunk
        return step, chunk

    def _decode(self, t: float, step: np.ndarray) -> None:
        if not self.d_piece.size:
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            steps = np.where(step > 0, self.dt / step, 0.0)
        self.d_left -= steps[self.d_rep]
        self.d_context += steps[self.d_rep]
        done = self.d_left <= 0
        if not done.any():
            return
        finish = t + self.dt + self.d_left[done] * step[self.d_rep[done]]
        piece, rep = self.d_piece[done], self.d_rep[done]
        self.kv_used -= np.bincount(rep, self.need[piece], self.kv_used.size)
        self._finish(piece, np.maximum(finish, t))
        keep = ~done
        self.d_piece, self.d_rep = self.d_piece[keep], self.d_rep[keep]
        self.d_context, self.d_left = self.d_context[keep], self.d_left[keep]

    # -- outcomes -----------------------------------------------------------------------------
    def _finish(self, piece, finish) -> None:
        piece = np.atleast_1d(piece)
        count = self.p.count[piece]
        self.ledger.finish(count, self.p.arrival[piece], self.first_lo[piece],
                           self.first_hi[piece], finish, self.p.output[piece])
        self.accounted += float(count.sum())

    def _fail(self, piece: int) -> None:
        self.ledger.fail(float(self.p.count[piece]),
                         float(self.p.count[piece] * self.p.output[piece]))
        self.accounted += float(self.p.count[piece])

    def fail_unfinished(self) -> None:
        for piece in np.concatenate([self.waiting_prefill, self.q_piece, self.w_piece,
                                     self.d_piece, np.arange(self.next_piece, len(self.p))]):
            self._fail(int(piece))

    # -- replicas -----------------------------------------------------------------------------
    def _capacity(self, t: float) -> float:
        return self.costs.decode_kv_capacity(self.attention,
                                             len(self.fleet.ready("decode", t)))

    def _refresh_share(self, t: float) -> None:
        self.attention = len(self.fleet.ready("attention", t))
        self.costs.attention_share = self.attention / max(len(self.fleet.ready("decode", t)), 1)

    def start_replica(self, role: str, now: float, *, warm: bool = False) -> None:
        self.fleet.start(role, now, warm=warm)
        if role == "decode":
            self.kv_used = np.append(self.kv_used, 0.0)
        if role == self.prefill_role:
            self.queued = np.append(self.queued, 0.0)

    def drain_replica(self, role: str, now: float) -> None:
        load = self.kv_used if role == "decode" else (
            self.queued if role == "prefill" else np.zeros(len(self.fleet.replicas[role])))
        chosen = self.fleet.drain_least_loaded(role, now, lambda k: load[k])
        if chosen is None:
            return
        self.draining.add((role, chosen))
        self._stop_drained(now)

    def _stop_drained(self, t: float) -> None:
        for role, k in list(self.draining):
            holds = (role == "decode" and (self.kv_used[k] > 1e-6 or (self.d_rep == k).any()))
            holds |= role == self.prefill_role and bool((self.q_rep == k).any())
            if not holds:
                self.fleet.stop(role, k, t)
                self.draining.discard((role, k))

    def late(self, now: float, ttft_s: float) -> float:
        """Requests still waiting for their first token past the TTFT target."""
        waiting = np.concatenate([self.waiting_prefill, self.q_piece])
        late = self.p.arrival[waiting] < now - ttft_s
        return float(self.p.count[waiting][late].sum())

    def queue_depth(self) -> dict[str, int]:
        queued = float(self.p.count[self.waiting_prefill].sum() + self.p.count[
            self.q_piece].sum())
        return {"prefill": round(queued),
                "decode": round(float(self.p.count[self.w_piece].sum()))}

    def kv_use(self) -> float:
        serving = self.fleet.serving("decode", float("inf"))
        capacity = self._capacity(float("inf"))
        if not serving or capacity <= 0:
            return 0.0
        return float(self.kv_used[serving].mean() / capacity)

    def busy(self, role: str, now: float) -> float:
        serving = self.fleet.serving(role, now)
        if not serving:
            return 0.0
        if role == "prefill" and self.busy_share.size == self.queued.size:
            return float(self.busy_share[serving].mean())
        if role == "decode":
            return self.kv_use()
        return 0.0


def _grouped_fit(rep: np.ndarray, need: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Which rows fit, each replica taking its rows in order while its free KV lasts."""
    order = np.argsort(rep, kind="stable")
    before = np.empty(rep.size)
    before[order] = _grouped_before(rep[order], need[order])
    return before + need <= free
