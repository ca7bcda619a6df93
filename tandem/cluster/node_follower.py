"""Pools that follow the Ray nodes (`follow_nodes`, as on Kubernetes).

There, each pool pod is one Ray node advertising one unit of its pool's resource
(`tandem node`), and the operator sizes the pools by scaling Deployments. The head keeps one
worker on each such node: it starts a worker, pinned to the node, when a node joins; it forgets
a worker whose node has left; and it never restarts a worker on a node the operator drained
(the pod is about to go). The pool manager stays the one owner of workers: this only calls it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import ray

from tandem.cluster.node_agent import POOL_RESOURCES
from tandem.cluster.periodic import Periodic

logger = logging.getLogger(__name__)

FOLLOW_INTERVAL_S = 2.0


def pool_nodes(roles: tuple[str, ...]) -> dict[str, list[str]]:
    """The alive Ray nodes advertising each role's resource, by node id."""
    out: dict[str, list[str]] = {role: [] for role in roles}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        for role in roles:
            if resources.get(POOL_RESOURCES[role], 0) >= 1:
                out[role].append(node["NodeID"])
    return out


def alive_node_ids() -> set[str]:
    return {node["NodeID"] for node in ray.nodes() if node.get("Alive")}


async def wait_for_pool_nodes(roles: tuple[str, ...], required: tuple[str, ...],
                              timeout_s: float, progress: Callable[..., None]) \
        -> dict[str, list[str]]:
    """The pool nodes, once every role in `required` has one (pods may still be scheduling);
    TimeoutError naming the roles still missing after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        nodes = pool_nodes(roles)
        missing = [role for role in required if not nodes[role]]
        if not missing:
            return nodes
        if loop.time() > deadline:
            raise TimeoutError(f"no {' or '.join(missing)} node joined the Ray cluster in "
                               f"{timeout_s:.0f} s (each pool pod runs `tandem node`)")
        progress(f"waiting for {', '.join(missing)} nodes to join")
        await asyncio.sleep(FOLLOW_INTERVAL_S)


class NodeFollower:
    """Every `interval_s`, one worker per pool node: added on a node that joined, forgotten
    when its node left."""

    def __init__(self, pools, interval_s: float = FOLLOW_INTERVAL_S) -> None:
        self.pools = pools
        self._adding: set[str] = set()  # node ids with a worker on its way
        self._periodic = Periodic("following the pool nodes", interval_s, self.sync)

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def sync(self) -> None:
        pools = self.pools
        nodes = pool_nodes(pools.roles)
        alive = {node for ids in nodes.values() for node in ids}
        pools.released_nodes &= alive  # a drained pod that has gone
        for worker in list(pools.members):
            if worker.node_id and worker.node_id not in alive \
                    and worker.state in ("ready", "dead"):
                logger.info("worker %s: its node left; forgetting it", worker.id)
                await pools.remove(worker.id)
        held = {w.node_id for w in pools.members
                if w.state in ("starting", "ready", "draining", "dead")}
        for role, ids in nodes.items():
            for node_id in ids:
                if node_id in held or node_id in pools.released_nodes \
                        or node_id in self._adding:
                    continue
                self._adding.add(node_id)
                task = asyncio.get_running_loop().create_task(self._add(role, node_id))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _add(self, role: str, node_id: str) -> None:
        try:
            worker = await self.pools.add(role, node_id=node_id)
            logger.info("a %s node joined: worker %s", role, worker.id)
        except Exception as e:
            logger.warning("could not start a %s worker on node %s: %r", role, node_id, e)
        finally:
            self._adding.discard(node_id)
