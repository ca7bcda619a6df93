"""Per-request mode: a discrete-event simulation, every request and every decode step.

Exact for the model it runs (FIFO prefill per replica, the router's least-loaded choice,
continuous batching with joins at step boundaries, KV reserved for prompt + output), and slow
at scale: for small clusters and for checking the cohort mode.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tandem.sim.costs import Costs
from tandem.sim.fleet import Fleet
from tandem.sim.workload import Workload


@dataclass
class PrefillReplica:
    queue: deque = field(default_factory=deque)  # request ids, FIFO
    queued_s: float = 0.0  # prefill work waiting or running, seconds
    busy: bool = False


@dataclass
class DecodeReplica:
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    context: np.ndarray = field(default_factory=lambda: np.zeros(0))
    left: np.ndarray = field(default_factory=lambda: np.zeros(0))  # tokens still to make
    joiners: list = field(default_factory=list)
    kv_used: float = 0.0
    stepping: bool = False
    # colocated: requests waiting for their prefill here, and the head's tokens done
    prefill: deque = field(default_factory=deque)
    head_done: float = 0.0


class PerRequestEngine:
    def __init__(self, workload: Workload, costs: Costs, fleet: Fleet, ledger, config) -> None:
        self.w, self.costs, self.fleet, self.ledger, self.config = (
            workload, costs, fleet, ledger, config)
        self.colocated = config.layout == "colocated"
        self.work = costs.prefill_s(workload.prompt)
        self.handoff = costs.handoff_s(workload.prompt)
        self.need = (workload.prompt + workload.output).astype(float)
        self.first = np.full(len(workload), np.nan)
        self.prefills: list[PrefillReplica] = []
        self.decodes: list[DecodeReplica] = []
        self.attention = 0
        self.waiting_prefill: deque = deque()  # no replica to take them
        self.waiting_decode: deque = deque()  # handed off, no KV yet
        self.accounted = np.zeros(len(workload), bool)  # finished or failed
        self.done = 0
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()

    # -- the event loop --------------------------------------------------------------------
    def at(self, time: float, kind: str, *args) -> None:
        heapq.heappush(self._events, (time, next(self._seq), kind, args))

    def run(self, until: float, on_tick, on_sample) -> float:
        for i, t in enumerate(self.w.arrival_s):
            self.at(float(t), "arrive", i)
        self.at(0.0, "tick")
        self.at(0.0, "sample")
        now = 0.0
        while self._events:
            now, _, kind, args = heapq.heappop(self._events)
            if now > until or self.done == len(self.w):
                break
            self.now = now
            if kind == "tick":
                on_tick(self, now)
                self.at(now + self.config.autoscale.interval_s, "tick")
            elif kind == "sample":
                on_sample(self, now)
                self.at(now + self.config.sample_s, "sample")
            else:
                getattr(self, "_" + kind)(now, *args)
        return min(self.now, until)

    # -- prefill ---------------------------------------------------------------------------
    def _arrive(self, now: float, i: int) -> None:
        role = "decode" if self.colocated else "prefill"
        ready = self.fleet.ready(role, now)
        if not ready:
            if len(self.waiting_prefill) >= self.config.max_queue:
                self._fail(i)
            else:
                self.waiting_prefill.append(i)
            return
        if self.colocated:
            r = min(ready, key=lambda k: (len(self.decodes[k].prefill), self.decodes[k].kv_used))
            self.decodes[r].prefill.append(i)
            if not self.decodes[r].stepping:
                self._step_start(now, r)
            return
        r = min(ready, key=lambda k: self.prefills[k].queued_s)
        replica = self.prefills[r]
        replica.queue.append(i)
        replica.queued_s += self.work[i]
        if not replica.busy:
            self._prefill_next(now, r)

    def _prefill_next(self, now: float, r: int) -> None:
        replica = self.prefills[r]
        if not replica.queue:
            replica.busy = False
            if self.fleet.replicas["prefill"][r].draining:
                self.fleet.stop("prefill", r, now)
            return
        replica.busy = True
        i = replica.queue[0]
        self.at(now + self.work[i], "prefill_done", r)

    def _prefill_done(self, now: float, r: int) -> None:
        replica = self.prefills[r]
        i = replica.queue.popleft()
        replica.queued_s -= self.work[i]
        self._first_token(now, i)
        if self.w.output[i] > 1:
            self.at(now + self.handoff[i], "handed_off", i)
        self._prefill_next(now, r)

    def _first_token(self, now: float, i: int) -> None:
        self.first[i] = now
        if self.w.output[i] <= 1:
            self._finish(now, i)

    def _handed_off(self, now: float, i: int) -> None:
        self.waiting_decode.append(i)
        self._admit(now)

    # -- decode ----------------------------------------------------------------------------
    def capacity(self) -> float:
        decode = len(self.fleet.ready("decode", self.now))
        self.costs.attention_share = self.attention / max(decode, 1)
        return self.costs.decode_kv_capacity(self.attention, decode)

    def _admit(self, now: float) -> None:
        ready = self.fleet.ready("decode", now)
        capacity = self.capacity()
        while self.waiting_decode and ready:
            i = self.waiting_decode[0]
            if self.need[i] > capacity:
                self.waiting_decode.popleft()
                self._fail(i)
                continue
            open_ = [k for k in ready if self._slots(k) > 0]
            if not open_:
                return
            r = min(open_, key=lambda k: self.decodes[k].kv_used)
            if capacity - self.decodes[r].kv_used < self.need[i]:
                return
            self.waiting_decode.popleft()
            self._join(now, r, i)

    def _slots(self, r: int) -> float:
        replica = self.decodes[r]
        return self.costs.max_batch - replica.ids.size - len(replica.joiners)

    def _join(self, now: float, r: int, i: int) -> None:
        replica = self.decodes[r]
        replica.joiners.append(i)
        replica.kv_used += self.need[i]
        if not replica.stepping:
            self._step_start(now, r)

    def _step_start(self, now: float, r: int) -> None:
        replica = self.decodes[r]
        if replica.joiners:
            ids = np.array(replica.joiners, np.int64)
            replica.joiners = []
            replica.ids = np.concatenate([replica.ids, ids])
            replica.context = np.concatenate([replica.context, self.w.prompt[ids] + 1.0])
            replica.left = np.concatenate([replica.left, self.w.output[ids] - 1.0])
        step = 0.0
        if replica.ids.size:
            step = float(self.costs.decode_step_s(np.array([replica.ids.size]),
                                                  np.array([replica.context.mean()]),
                                                  np.array([replica.kv_used]))[0])
        chunk = self._chunk(r) if self.colocated else []
        step += sum(self.work[i] * tokens / self.w.prompt[i] for i, tokens in chunk)
        if step <= 0:
            replica.stepping = False
            if self.fleet.replicas["decode"][r].draining:
                self.fleet.stop("decode", r, now)
            return
        replica.stepping = True
        self.at(now + step, "step_done", r, chunk)

    def _chunk(self, r: int) -> list[tuple[int, float]]:
        """Colocated: the prefill tokens this step takes from the queue (KV reserved first)."""
        replica, budget, chunk = self.decodes[r], float(self.config.chunk_tokens), []
        capacity = self.capacity()
        for n, i in enumerate(replica.prefill):
            if n == 0 and replica.head_done == 0.0:
                if capacity - replica.kv_used < self.need[i]:
                    break
                replica.kv_used += self.need[i]
            elif n > 0:
                if budget <= 0 or capacity - replica.kv_used < self.need[i]:
                    break
                replica.kv_used += self.need[i]
            done = replica.head_done if n == 0 else 0.0
            tokens = min(budget, self.w.prompt[i] - done)
            chunk.append((i, tokens))
            budget -= tokens
            if budget <= 0:
                break
        return chunk

    def _step_done(self, now: float, r: int, chunk: list) -> None:
        replica = self.decodes[r]
        if replica.ids.size:
            replica.left -= 1
            replica.context += 1
            finished = replica.left <= 0
            for i in replica.ids[finished]:
                self._finish(now, int(i))
            replica.kv_used -= float(self.need[replica.ids[finished]].sum())
            keep = ~finished
            replica.ids, replica.context, replica.left = (
                replica.ids[keep], replica.context[keep], replica.left[keep])
        for n, (i, tokens) in enumerate(chunk):
            done = (replica.head_done if n == 0 else 0.0) + tokens
            if done >= self.w.prompt[i]:
                replica.prefill.popleft()
                replica.head_done = 0.0
                self._first_token(now, i)
                if self.w.output[i] > 1:
                    replica.joiners.append(i)
                else:
                    replica.kv_used -= self.need[i]
            else:
                replica.head_done = done
        if not self.colocated:
            self._admit(now)
        self._step_start(now, r)

    # -- outcomes, and the controller's hooks ------------------------------------------------
    def _finish(self, now: float, i: int) -> None:
        self.ledger.finish(1.0, self.w.arrival_s[i], self.first[i], self.first[i], now,
                           self.w.output[i])
        self.accounted[i] = True
        self.done += 1

    def _fail(self, i: int) -> None:
        self.ledger.fail(1.0, float(self.w.output[i]))
        self.accounted[i] = True
        self.done += 1

    def fail_unfinished(self) -> None:
        """At the horizon: what has not finished has failed."""
        for i in np.flatnonzero(~self.accounted):
            self._fail(int(i))

    def _ready(self, now: float, role: str) -> None:
        if role == "attention":
            self.attention = len(self.fleet.ready("attention", now))
        while self.waiting_prefill and self.fleet.ready(
                "decode" if self.colocated else "prefill", now):
            self._arrive(now, self.waiting_prefill.popleft())
        self._admit(now)

    def start_replica(self, role: str, now: float, *, warm: bool = False) -> None:
        self.fleet.start(role, now, warm=warm)
        {"prefill": self.prefills, "decode": self.decodes}.get(role, []).append(
            PrefillReplica() if role == "prefill" else DecodeReplica())
        self.at(self.fleet.replicas[role][-1].ready_at, "ready", role)

    def drain_replica(self, role: str, now: float) -> None:
        load = {"prefill": lambda k: self.prefills[k].queued_s,
                "decode": lambda k: self.decodes[k].kv_used}.get(role, lambda k: 0.0)
        r = self.fleet.drain_least_loaded(role, now, load)
        if r is None:
            return
        if role == "attention":
            self.attention = len(self.fleet.ready("attention", now))
            self.fleet.stop(role, r, now)
        elif ((role == "prefill" and not self.prefills[r].busy)
              or (role == "decode" and not self.decodes[r].stepping)):
            self.fleet.stop(role, r, now)

    def queue_depth(self) -> dict[str, int]:
        queued = sum(len(p.queue) - p.busy for p in self.prefills)
        if self.colocated:
            queued = sum(len(d.prefill) for d in self.decodes)
        return {"prefill": len(self.waiting_prefill) + queued,
                "decode": len(self.waiting_decode)}

    def kv_use(self) -> float:
        ready = self.fleet.serving("decode", float("inf"))
        capacity = self.capacity()
        if not ready or capacity <= 0:
            return 0.0
        return float(np.mean([self.decodes[r].kv_used for r in ready])) / capacity

    def busy(self, role: str, now: float) -> float:
        ready = self.fleet.serving(role, now)
        if not ready:
            return 0.0
        if role == "prefill":
            return float(np.mean([self.prefills[r].busy for r in ready]))
        if role == "decode":
            return self.kv_use()
        return 0.0
