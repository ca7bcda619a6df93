"""Placing workers on Ray: one custom resource per pool, so each pool lands on its own nodes.

A node joins a pool by advertising the pool's resource (`ray start --resources
'{"tandem_prefill": 4}'`); a local cluster started here advertises enough of each. Workers ask
for one GPU each when the cluster has GPUs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tandem.attention_worker.worker import AttentionWorker
from tandem.cluster.config import ServeConfig
from tandem.cluster.node_agent import POOL_RESOURCES
from tandem.decode_worker.worker import DecodeWorker
from tandem.faults import ENV_VAR as FAULTS_ENV
from tandem.prefill_worker.worker import PrefillWorker

logger = logging.getLogger(__name__)

# Passed on to worker processes: fault injection, logging, tokenizer threads, UCX (NIXL).
POOL_CAPACITY = 16  # workers a local cluster can hold per pool
FORWARDED_ENV = (FAULTS_ENV, "TANDEM_LOG_LEVEL", "TOKENIZERS_PARALLELISM")


def connect_ray(config: ServeConfig) -> bool:
    """Join or start Ray; True when this call started a local cluster (and owns it)."""
    if ray.is_initialized():
        return False
    if config.ray.address:
        ray.init(address=config.ray.address, logging_level=logging.WARNING)
        return False
    # Each pool resource, as much as a pool may grow to, so added workers can be placed.
    workers = max(config.prefill_workers + config.decode_workers + config.attention_workers,
                  POOL_CAPACITY)
    # Token authentication, asked for explicitly: Ray then makes a token (~/.ray/auth_token)
    # when there is none, instead of warning that it turned authentication on by itself.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False,
             logging_level=logging.WARNING,
             resources={name: workers for name in POOL_RESOURCES.values()})
    return True


def start_pool(pool: str, count: int, config: ServeConfig, first_slot: int = 0,
               node_id: str | None = None) -> list[Any]:
    """Create `count` worker actors of `pool` (prefill, decode, colocated or attention), for
    the slots from `first_slot` on; on the Ray node `node_id` only, when given."""
    cls = {"prefill": PrefillWorker, "attention": AttentionWorker}.get(pool, DecodeWorker)
    env = {k: v for k, v in os.environ.items() if k in FORWARDED_ENV or k.startswith("UCX_")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", str(config.worker.engine.num_threads or 1))
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    actor = ray.remote(cls).options(
        resources={POOL_RESOURCES[pool]: 1}, num_cpus=0, num_gpus=1 if has_gpu else 0,
        max_concurrency=1000, runtime_env={"env_vars": env},
        **({"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}
           if node_id else {}))
    worker_config = config.worker
    if has_gpu and worker_config.engine.device == "auto":
        worker_config = worker_config.model_copy(
            update={"engine": worker_config.engine.model_copy(update={"device": "cuda"})})
    if pool == "prefill":  # the index names the worker's SSD directory
        return [actor.remote(worker_config, config.model_id, index=first_slot + i)
                for i in range(count)]
    extra = {"receives_kv": False} if pool == "colocated" else {}  # they prefill themselves
    return [actor.remote(worker_config, config.model_id, **extra) for _ in range(count)]
