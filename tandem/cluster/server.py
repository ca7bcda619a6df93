"""`TandemServer`: start the workers on Ray, then the gateway; stop them in reverse."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import ray
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tandem.cluster.admin import AdminService
from tandem.cluster.auth import ApiKeys
from tandem.cluster.autoscale_loop import AutoscaleLoop, start_autoscaling
from tandem.cluster.config import ServeConfig
from tandem.cluster.frontend import Frontend
from tandem.cluster.gateway import Gateway
from tandem.cluster.kv_index import KVIndex
from tandem.cluster.metrics import ClusterMetrics
from tandem.cluster.node_follower import NodeFollower
from tandem.cluster.openai.app import build_app
from tandem.cluster.openai.server import HttpServer
from tandem.cluster.placement import connect_ray
from tandem.cluster.pools import PoolManager, PoolWorker
from tandem.cluster.rebalancer import Rebalancer
from tandem.cluster.redis_server import RedisServer, find_redis_server
from tandem.cluster.router import Router
from tandem.cluster.wire import add_admin_service, add_tandem_service
from tandem.cluster.worker_status import WorkerMonitor
from tandem.engine.loader import load_tokenizer
from tandem.kv_store.keys import namespace
from tandem.proto.v1 import admin_pb2 as apb
from tandem.proto.v1 import tandem_pb2 as pb
from tandem.worker_base import WorkerInfo

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tandem"].full_name
ADMIN_SERVICE_NAME = apb.DESCRIPTOR.services_by_name["Admin"].full_name
WORKER_START_TIMEOUT_S = 600.0


class TandemServer:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.prefill_workers: list[Any] = []
        self.decode_workers: list[Any] = []
        self.router: Router | None = None
        self.address: str | None = None
        self._owns_ray = False
        self.redis: RedisServer | None = None  # the embedded shared KV tier, when started here
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._http: HttpServer | None = None
        self.http_address: str | None = None  # HOST:PORT of the HTTP API, when it runs
        self.metrics: ClusterMetrics | None = None
        self.frontend: Frontend | None = None
        self.pools: PoolManager | None = None
        self.monitor: WorkerMonitor | None = None
        self.rebalancer: Rebalancer | None = None
        self.autoscaler: AutoscaleLoop | None = None
        self.follower: NodeFollower | None = None
        self.draining = False
        # Start-up steps, for a progress display: (step, parts done, parts in all).
        self.progress: Callable[..., None] = lambda step, done=None, total=None: None

    async def start(self) -> str:
        """Start everything; returns the gateway's HOST:PORT."""
        # Started from this thread: redis-server is told to exit when its parent thread dies.
        c = self.config = self._with_redis(_local_kv_host(self.config))
        self.progress("starting Ray")
        self._owns_ray = connect_ray(c)
        self.pools = PoolManager(c, c.gateway.worker_call_timeout_s)
        self.pools.progress = self.progress
        # The pools' lists, changed in place as workers come and go: the router shares them.
        self.prefill_workers, self.decode_workers = \
            self.pools.prefill_actors, self.pools.decode_actors
        logger.info("loading the model on %d workers%s", c.prefill_workers + c.decode_workers,
                    f" (and {c.attention_workers} attention workers, which load no weights)"
                    if c.attention_workers else "")
        tokenizer_task = asyncio.create_task(
            asyncio.to_thread(load_tokenizer, c.worker.engine.model))
        infos = await self.pools.start()
        tokenizer, model_config = await tokenizer_task
        self.progress("starting the gateway")
        _check_agree(infos)
        kv_transports, kv_receivers = self.pools.kv_transports, self.pools.kv_receivers
        if not c.colocated:
            logger.info("KV handoff (--kv-transport %s): prefill workers send with %s; "
                           "decode workers receive with %s", c.worker.kv_transport,
                           _ways(kv_transports),
                           _ways([tuple(r.transport for r in rs) for rs in kv_receivers]))
            note = codec_note(c.worker.kv_codec, kv_transports)
            if note:
                logger.warning("%s", note)
        self.router = Router(self.prefill_workers, self.decode_workers, kv_receivers,
                             kv_transports, c.colocated,
                             c.gateway.max_queued_requests, c.gateway.worker_call_timeout_s,
                             handoff_timeout_s=c.worker.handoff_timeout_s,
                             block_size=infos[0].kv_spec.block_size,
                             attention_workers=self.pools.attention_actors,
                             attention_infos=self.pools.attention_infos, offload=c.worker.offload)
        store = c.worker.kv_store
        if store.enabled and not c.colocated:
            self.router.kv_index = KVIndex(
                self.prefill_workers, namespace(infos[0].fingerprint, infos[0].kv_spec),
                store.chunk_tokens, c.gateway.worker_call_timeout_s)
            self.router.kv_index.start()
            logger.info("KV store: %s; chunks of %d tokens", _tiers(store),
                           store.chunk_tokens)
        model = pb.ModelInfo(id=c.model_id, max_model_len=infos[0].max_model_len,
                             fingerprint=infos[0].fingerprint)
        self.metrics = ClusterMetrics(c.model_id)
        keys = ApiKeys(c.gateway.api_keys)
        frontend = self.frontend = Frontend(self.router, tokenizer, model,
                                            model_config.vocab_size, c.gateway, self.metrics)
        self.monitor = WorkerMonitor(self.pools, self.metrics, c.gateway.worker_call_timeout_s)
        await self.monitor.refresh()
        self.monitor.start()
        self.pools.on_change = self._pool_changed
        self.pools.evict = lambda worker: self.router.evict(worker.slot)
        if not c.colocated and c.gateway.rebalance.enabled:
            self.rebalancer = Rebalancer(self.router, c.gateway.rebalance)
            self.rebalancer.start()
        self.pools.start_health_checks()
        if c.follow_nodes:
            self.follower = NodeFollower(self.pools)
            self.follower.start()
        if c.autoscale.enabled:
            self.autoscaler = start_autoscaling(c, self.pools, self.monitor, self.metrics,
                                                lambda: self.router.num_queued)
        pools = [w.stats.engine.num_blocks for w in self.monitor.workers
                 if w.role in ("decode", "colocated") and w.stats is not None]
        if pools:
            frontend.kv_capacity_tokens = min(pools) * infos[0].kv_spec.block_size
        limit = c.gateway.max_message_bytes
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                                ("grpc.max_send_message_length", limit)])
        add_tandem_service(Gateway(frontend, keys), self._server)
        add_admin_service(AdminService(c.model_id, self.monitor, self.router, keys),
                          self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self._server)
        bind = f"{c.gateway.host}:{c.gateway.port}"
        port = self._server.add_secure_port(bind, c.gateway.tls.server_credentials()) \
            if c.gateway.tls else self._server.add_insecure_port(bind)
        if port == 0:
            raise OSError(f"cannot bind the gateway to {c.gateway.host}:{c.gateway.port}")
        await self._server.start()
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.address = f"{c.gateway.host}:{port}"
        if c.gateway.http_port is not None:
            app = build_app(frontend, keys, self.metrics.registry, c.gateway.cors_origins,
                            lambda: self.draining)
            self._http = HttpServer(app, c.gateway.host, c.gateway.http_port, c.gateway.tls,
                                    c.gateway.shutdown_grace_s)
            self.http_address = await self._http.start()
        return self.address

    def _pool_changed(self, worker: PoolWorker) -> None:
        """A worker was added, replaced, removed or found dead: tell those that route."""
        router = self.router
        assert router is not None
        if worker.role == "prefill":
            if worker.state == "ready":
                router.lost_prefill.discard(worker.slot)
            else:
                router.lost_prefill.add(worker.slot)
            if router.kv_index is not None:
                router.kv_index.slot_changed(worker.slot)
        if worker.role == "attention":  # a draining or dead one gets no new range
            if worker.state == "ready":
                router.attention_draining.discard(worker.slot)
            else:
                router.attention_draining.add(worker.slot)
        router.admission.capacity_changed()  # a new decode worker has free blocks

    def _with_redis(self, config: ServeConfig) -> ServeConfig:
        """`config` with the URL of an embedded redis-server, when the store wants one."""
        store = config.worker.kv_store
        if not store.enabled or config.colocated or store.redis.url or not store.redis.embedded:
            return config
        if config.ray.address:  # workers on other nodes could not reach a loopback server
            logger.warning("KV store: no shared tier; on a multi-node Ray cluster set "
                           "kv_store.redis.url (--kv-redis-url)")
            return config
        if find_redis_server() is None:
            logger.warning("KV store: no redis-server found, so no shared tier; install it "
                           "(apt-get install redis-server) or set kv_store.redis.url")
            return config
        server = RedisServer(int(store.redis.capacity_gb * 2**30))
        try:
            server.start()
        except (OSError, RuntimeError) as e:  # TimeoutError is an OSError
            server.close()
            logger.warning("KV store: the embedded redis-server did not start (%s); "
                           "no shared tier", e)
            return config
        self.redis = server
        redis = store.redis.model_copy(update={"url": self.redis.url})
        worker = config.worker.model_copy(
            update={"kv_store": store.model_copy(update={"redis": redis})})
        return config.model_copy(update={"worker": worker})

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self) -> None:
        """Stop taking requests, let running ones finish (grace period), then stop workers.
        Meanwhile /health answers 503 and gRPC health NOT_SERVING, so load balancers send
        new requests elsewhere, and those that still come are refused with UNAVAILABLE."""
        self.draining = True
        if self.frontend is not None:
            self.frontend.draining = True
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
        if self.router is not None and self.router.active:
            deadline = time.monotonic() + self.config.gateway.shutdown_grace_s
            logger.info("shutting down: waiting up to %.0f s for %d running requests",
                        self.config.gateway.shutdown_grace_s, len(self.router.active))
            while self.router.active and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self._server is not None:
            await self._server.stop(grace=1.0)  # what is left gets cancelled
            self._server = None
        if self.autoscaler is not None:
            await self.autoscaler.stop()
            self.autoscaler = None
        if self.follower is not None:
            await self.follower.stop()
            self.follower = None
        if self.monitor is not None:
            await self.monitor.stop()
            self.monitor = None
        if self.rebalancer is not None:
            await self.rebalancer.stop()
            self.rebalancer = None
        if self.router is not None:
            await self.router.drain()
        if self.pools is not None:
            await self.pools.shutdown()
            self.pools = None
        self.prefill_workers, self.decode_workers = [], []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
        if self.redis is not None:
            await asyncio.to_thread(self.redis.close)
            self.redis = None


def codec_note(kv_codec: str, kv_transports: list[tuple[str, ...]]) -> str | None:
    """What to tell the user when `--kv-codec` cannot apply to the transports chosen."""
    if kv_codec == "raw" or not any("nixl" in names for names in kv_transports):
        return None
    return (f"--kv-codec {kv_codec} applies to gRPC handoffs only: NIXL writes raw blocks "
            "straight into the decode worker's memory (use --kv-transport grpc to code KV on "
            "the wire)")


def _local_kv_host(config: ServeConfig) -> ServeConfig:
    """On a local Ray cluster, KV receivers bind loopback unless told otherwise: nothing from
    other hosts needs to (or may) reach them."""
    if config.ray.address or config.worker.host is not None:
        return config
    worker = config.worker.model_copy(update={"host": "127.0.0.1"})
    return config.model_copy(update={"worker": worker})


def _check_agree(infos: list[WorkerInfo]) -> None:
    """Every worker must serve the same model with the same KV layout to swap KV."""
    first = infos[0]
    for info in infos[1:]:
        if (info.fingerprint, info.kv_spec) != (first.fingerprint, first.kv_spec):
            raise RuntimeError(f"workers disagree on the model or KV layout: {first} vs {info}")


def _tiers(store) -> str:
    sizes = [("gpu", store.gpu_gb), ("cpu", store.cpu_gb), ("ssd", store.ssd_gb)]
    tiers = [f"{name} {gb:g} GiB" for name, gb in sizes if gb > 0]
    if store.ssd_gb > 0:
        tiers[-1] += f" ({store.ssd_root})"
    if store.redis.url:
        tiers.append(f"redis at {store.redis.url.split('@')[-1]}")
    return " + ".join(tiers) or "no tiers"


def _ways(per_worker: list[tuple[str, ...]]) -> str:
    return ", ".join(sorted({"+".join(names) or "none" for names in per_worker}))
