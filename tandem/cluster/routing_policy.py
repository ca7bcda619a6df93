"""Which worker gets a request: pure functions of what the router knows."""

from __future__ import annotations

from tandem.cluster.errors import InvalidRequest, WorkerUnavailable
from tandem.cluster.kv_index import KVIndex
from tandem.cluster.routed import RoutedRequest
from tandem.worker_base import WorkerStats


def decode_order(stats: list[WorkerStats | BaseException]) -> list[int]:
    """Decode workers by most free KV blocks, then smallest batch; those that did not answer
    are left out (UNAVAILABLE when none answered)."""
    live = [i for i, s in enumerate(stats) if not isinstance(s, BaseException)]
    if not live:
        raise WorkerUnavailable(f"no decode worker answers: {stats[0]}")
    return sorted(live, key=lambda i: (-stats[i].engine.num_free_blocks,  # type: ignore[union-attr]
                                       stats[i].engine.num_running))  # type: ignore[union-attr]


def pick_prefill(req: RoutedRequest, count: int, queued_prompt_tokens: dict[int, int],
                 kv_index: KVIndex | None, lost: set[int] | frozenset[int] = frozenset()) -> int:
    """The prefill worker with the least work ahead: queued prompt tokens plus the tokens this
    prompt leaves to compute after the prefix chunks it holds locally; none of those `lost`."""
    live = [i for i in range(count) if i not in lost]
    if not live:
        raise WorkerUnavailable(f"no prefill worker is left ({count} lost)")
    if req.prefill_worker is not None:
        if not 0 <= req.prefill_worker < count:
            raise InvalidRequest(f"prefill_worker: {req.prefill_worker} is not in [0, {count})")
        return req.prefill_worker
    n = len(req.prompt_token_ids)
    keys = kv_index.prefix_keys(req.prompt_token_ids, req.params.cache_salt) if kv_index else []

    def cost(i: int) -> tuple[int, int]:
        queued = queued_prompt_tokens.get(i, 0)
        cached = kv_index.cached_tokens(i, keys) if kv_index else 0
        return n - cached + queued, queued

    return min(live, key=cost)


def rebalance_pair(stats: list[WorkerStats | BaseException], high_water: float,
                   low_water: float, draining: set[int]) -> tuple[int, int] | None:
    """(from, to): the decode worker using the most of its KV blocks, when that is past
    `high_water`, and the one using the least, when that is under `low_water`; None when no
    pair is that far apart. Draining and silent workers take no part."""
    use = {i: 1 - s.engine.num_free_blocks / s.engine.num_blocks
           for i, s in enumerate(stats)
           if not isinstance(s, BaseException) and i not in draining and s.engine.num_blocks}
    if len(use) < 2:
        return None
    fullest, emptiest = max(use, key=use.__getitem__), min(use, key=use.__getitem__)
    if use[fullest] >= high_water and use[emptiest] <= low_water:
        return fullest, emptiest
    return None
