"""`Rebalancer`: move running requests off a decode worker whose KV blocks run out while
another has room (Llumnix's load balancing), before the full one has to preempt.

Every `interval_s` it asks the decode workers for their stats; when the fullest uses at least
`high_water` of its blocks and the emptiest at most `low_water`, it moves one request from the
first (the longest that fits in the second's free blocks) with `Router.start_move`, and waits
for that move to end before it looks again. Moves go over the KV transports (`migration.py`);
the client's stream goes on.
"""

from __future__ import annotations

import asyncio
import logging

from tandem.cluster.config import RebalanceConfig
from tandem.cluster.periodic import Periodic
from tandem.cluster.router import Router
from tandem.cluster.routing_policy import rebalance_pair

logger = logging.getLogger(__name__)


class Rebalancer:
    def __init__(self, router: Router, config: RebalanceConfig) -> None:
        self.router, self.config = router, config
        self.num_moves = 0
        self._periodic = Periodic("rebalancing", config.interval_s, self.check)

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def check(self) -> bool:
        """One round: whether a request was moved."""
        router = self.router
        stats = await asyncio.gather(
            *(router._call(w.stats.remote()) for w in router.decode_workers),
            return_exceptions=True)
        pair = rebalance_pair(stats, self.config.high_water, self.config.low_water,
                              router.draining)
        if pair is None:
            return False
        source, target = pair
        room = stats[target].engine.num_free_blocks * router.block_size  # type: ignore[union-attr]
        movable = [p for p in router.active.values()
                   if p.decode_slot == source and p.moving is None and not p.aborted
                   and p.origin is not None and p.generated
                   and not p.ranges]  # an offloaded one holds no block there: no relief
        sizes = {id(p): len(p.origin.prompt_token_ids) + len(p.generated)  # type: ignore[union-attr,arg-type]
                 for p in movable}
        fitting = [p for p in movable if sizes[id(p)] < room]
        if not fitting:
            return False
        placed = max(fitting, key=lambda p: sizes[id(p)])
        logger.info("decode slot %d is past its KV high-water mark and slot %d has room: "
                    "moving request %s (%d tokens)", source, target, placed.worker_id,
                    sizes[id(placed)])
        router.start_move(placed)
        assert placed.moving is not None
        await asyncio.gather(placed.moving, return_exceptions=True)
        self.num_moves += 1
        return True
