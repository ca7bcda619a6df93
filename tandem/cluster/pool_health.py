"""The pool manager's health checks: every serving worker is asked for its stats; one that is
gone is restarted in its slot (within the restart budget), and one that got a SIGTERM is
drained. Kept apart from `pools.py`, which owns the lifecycle these call."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ray.exceptions import RayActorError

from tandem.cluster.node_follower import alive_node_ids

if TYPE_CHECKING:
    from tandem.cluster.pools import PoolManager

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 5.0


async def check_health(pools: PoolManager) -> list[str]:
    """Ask every serving worker for its stats; restart those that are gone (within the
    budget), and start draining those that got a SIGTERM. The ids restarted."""
    serving = [w for w in pools.members if w.state == "ready"]
    answers = await asyncio.gather(
        *(asyncio.wait_for(w.actor.stats.remote(), pools.call_timeout_s) for w in serving),
        return_exceptions=True)
    for worker, answer in zip(serving, answers, strict=True):
        if getattr(answer, "drain_requested", False):  # SIGTERM: take it out gently
            logger.info("worker %s got SIGTERM: draining it", worker.id)
            task = asyncio.get_running_loop().create_task(pools.drain(worker.id))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            pools._drains.add(task)
            task.add_done_callback(pools._drains.discard)
        if isinstance(answer, RayActorError):  # gone (a slow answer is not a death)
            worker.state = "dead"
            logger.warning("worker %s died (restarts so far: %d of %d)", worker.id,
                           worker.restarts, pools.restart_budget)
            pools.on_change(worker)
    restarted = []
    for worker in [w for w in pools.members if w.state == "dead"]:
        if worker.restarts >= pools.restart_budget:
            continue  # reported when it died; it stays dead
        if worker.node_id and worker.node_id not in alive_node_ids():
            continue  # its node left: the node follower forgets it
        worker.restarts += 1
        try:
            new = await pools.replace(worker.id)
            restarted.append(new.id)
        except Exception as e:  # the slot stays dead; the next check tries again
            logger.error("worker %s did not restart: %r", worker.id, e)
    return restarted
