"""Grouping requests into cohorts: the same arrival slice and length bucket, split into pieces
of a few requests. Pieces are the cohort mode's units; each keeps its members' exact count and
mean lengths, so token totals are conserved."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tandem.sim.workload import Workload

BUCKET_RATIO = 1.25  # length buckets are geometric: at most 25% apart


@dataclass(frozen=True)
class Pieces:
    arrival: np.ndarray  # the members' mean arrival, seconds
    count: np.ndarray  # members (float, for weighting)
    prompt: np.ndarray  # mean prompt tokens
    output: np.ndarray  # mean output tokens

    def __len__(self) -> int:
        return len(self.arrival)


def make_pieces(workload: Workload, cohort_s: float, max_members: int, kv_capacity: float,
                prefill_s: Callable[[np.ndarray], np.ndarray], slice_s: float) -> Pieces:
    """Cohorts of (arrival slice, prompt bucket, output bucket), each cut into pieces of at
    most `max_members` requests, at most a quarter of one replica's KV, and at most one slice
    of prefill work (a piece decodes once all its members are prefilled: the first ones wait
    for the last, so the wait is kept under a slice)."""
    log_ratio = np.log(BUCKET_RATIO)
    slot = np.floor(workload.arrival_s / cohort_s).astype(np.int64)
    prompt_bucket = np.floor(np.log(workload.prompt) / log_ratio).astype(np.int64)
    output_bucket = np.floor(np.log(workload.output) / log_ratio).astype(np.int64)
    key = (slot * 4096 + prompt_bucket) * 4096 + output_bucket
    groups, inverse = np.unique(key, return_inverse=True)
    n = np.bincount(inverse).astype(float)
    arrival = np.bincount(inverse, workload.arrival_s) / n
    prompt = np.bincount(inverse, workload.prompt.astype(float)) / n
    output = np.bincount(inverse, workload.output.astype(float)) / n
    per_piece = np.minimum(np.floor(0.25 * kv_capacity / (prompt + output)),
                           np.floor(slice_s / prefill_s(prompt)))
    per_piece = np.clip(per_piece, 1, max_members)
    pieces = np.ceil(n / per_piece).astype(np.int64)
    group = np.repeat(np.arange(len(groups)), pieces)
    # spread each group's members evenly over its pieces
    rank = np.arange(group.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    base = np.floor(n / pieces)[group]
    extra = (n - np.floor(n / pieces) * pieces)[group]
    count = base + (rank < extra)
    order = np.argsort(arrival[group], kind="stable")
    return Pieces(arrival[group][order], count[order], prompt[group][order],
                  output[group][order])
