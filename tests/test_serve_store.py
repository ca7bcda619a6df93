"""Prefix reuse through the cluster, on a real Ray cluster with two prefill workers, SSD tiers
in a temporary directory and a real redis-server as the shared tier: cached_tokens, equal
greedy outputs, reuse from Redis on the other worker, KV-aware routing, corrupted objects, and
Redis going away and coming back."""

from __future__ import annotations

import time

import grpc
import pytest
import ray

from tandem.cluster.gateway import PREFILL_WORKER_KEY
from tandem.kv_store.tiers.redis import RedisTier
from tandem.proto.v1 import tandem_pb2 as pb
from tandem.proto.v1 import tandem_pb2_grpc as pb_grpc

from .conftest import greedy, run_to_completion, serve_config

pytestmark = pytest.mark.slow

CHUNK = 256
PREFIX = 1000  # shared prompt tokens: 3 whole chunks (768 tokens) are reusable
MAX_TOKENS = 8


def tokens(seed: int, n: int) -> list[int]:
    """A deterministic prompt of ordinary vocabulary ids."""
    return [1000 + (seed * 7919 + i * 104729) % 40000 for i in range(n)]


def prompt(prefix_seed: int, tail_seed: int, prefix: int = PREFIX) -> list[int]:
    return tokens(prefix_seed, prefix) + tokens(tail_seed, 40)


@pytest.fixture(scope="module")
def cluster(ray_cluster, redis_server, tmp_path_factory):
    from .serving import ServerThread

    RedisTier(redis_server.url, 1).client.flushall()
    # No CPU tier, so the SSD tier is each worker's first (and the corrupted-file test reads it).
    # Raw KV in every tier: outputs must equal the single engine's (the codec has its tests).
    config = serve_config(prefill_workers=2, gateway={"debug_routing": True}, worker={
        "engine": {"kv_cache_gb": 0.1},
        "kv_store": {"cpu_gb": 0, "ssd_dir": str(tmp_path_factory.mktemp("kv")),
                     "ssd_codec": "raw", "redis": {"url": redis_server.url, "codec": "raw"}}})
    running = ServerThread(config)
    yield running
    running.close()


@pytest.fixture(scope="module")
def reference(make_engine_module):
    engine = make_engine_module(kv_cache_gb=0.2, enable_prefix_caching=False, num_threads=1)
    cache: dict[tuple[int, ...], list[int]] = {}

    def greedy_output(ids: list[int]) -> list[int]:
        if tuple(ids) not in cache:
            cache[tuple(ids)] = run_to_completion(engine, [ids], greedy(MAX_TOKENS))[0]
        return cache[tuple(ids)]

    return greedy_output


@pytest.fixture(scope="module")
def make_engine_module(loaded_fp32):
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import LLMEngine

    return lambda **kw: LLMEngine(EngineConfig(dtype="float32", **kw), loaded=loaded_fp32)


def generate(cluster, ids: list[int], worker: int | None = None, salt: str | None = None) \
        -> tuple[list[int], pb.Usage]:
    metadata = [(PREFILL_WORKER_KEY, str(worker))] if worker is not None else []
    with grpc.insecure_channel(cluster.address) as channel:
        replies = list(pb_grpc.TandemStub(channel).Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingOptions(
                max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, cache_salt=salt)),
            metadata=metadata, timeout=300))
    return [t for r in replies for t in r.token_ids], replies[-1].usage


def store_stats(cluster, worker: int):
    stats = ray.get(cluster.server.prefill_workers[worker].stats.remote(), timeout=30)
    return {t.name: t for t in stats.kv_store.tiers}, stats.kv_store


def wait_for_writes(cluster) -> None:
    cluster.wait_until(lambda stats: all(
        s.kv_store is None or s.kv_store.pending_writes == 0 for s in stats), timeout=60)


def test_a_shared_prefix_is_reused_and_gives_the_same_output(cluster, reference):
    first = prompt(1, 10)
    out, usage = generate(cluster, first, worker=0)
    assert usage.cached_tokens == 0 and out == reference(first)
    wait_for_writes(cluster)
    second = prompt(1, 11)
    out, usage = generate(cluster, second, worker=0)
    assert usage.cached_tokens == PREFIX // CHUNK * CHUNK == 768
    assert out == reference(second)
    tiers, _ = store_stats(cluster, 0)
    assert tiers["ssd"].hits == 3


def test_the_other_prefill_worker_loads_the_prefix_from_redis(cluster, reference):
    wait_for_writes(cluster)
    third = prompt(1, 12)
    out, usage = generate(cluster, third, worker=1)
    assert usage.cached_tokens == 768 and out == reference(third)
    tiers, _ = store_stats(cluster, 1)
    assert tiers["redis"].hits == 3 and tiers["ssd"].hits == 0


def test_router_sends_a_prompt_to_the_worker_holding_its_prefix(cluster, reference):
    warm = prompt(2, 20, prefix=600)  # 2 chunks, held by worker 1 only (and Redis)
    generate(cluster, warm, worker=1)
    wait_for_writes(cluster)
    index = cluster.server.router.kv_index
    keys = index.prefix_keys(warm)[:2]
    deadline = time.monotonic() + 10
    while not all(k in index.keys[1] for k in keys):  # the router polls the workers' changes
        assert time.monotonic() < deadline, "the router never learned worker 1's chunks"
        time.sleep(0.1)
    before = [store_stats(cluster, w)[0]["ssd"].hits for w in (0, 1)]
    follow = prompt(2, 21, prefix=600)
    out, usage = generate(cluster, follow)
    after = [store_stats(cluster, w)[0]["ssd"].hits for w in (0, 1)]
    assert usage.cached_tokens == 512 and out == reference(follow)
    assert after[1] - before[1] == 2 and after[0] == before[0]


def test_corrupted_chunks_on_ssd_and_in_redis_are_counted_and_recomputed(cluster, reference,
                                                                         redis_server):
    warm = prompt(3, 30, prefix=300)  # one chunk
    generate(cluster, warm, worker=0)
    wait_for_writes(cluster)
    key = cluster.server.router.kv_index.prefix_keys(warm)[0]
    ssd_dir = cluster.server.config.worker.kv_store.ssd_root / "prefill-0"
    path = ssd_dir / f"{key.replace(':', '_')}.kv"
    damaged = bytearray(path.read_bytes())
    damaged[-100] ^= 0x04
    path.write_bytes(damaged)
    client = RedisTier(redis_server.url, 1).client
    part = bytearray(client.get(f"{key}#0"))
    part[-100] ^= 0x04
    client.set(f"{key}#0", bytes(part))
    before, _ = store_stats(cluster, 0)
    follow = prompt(3, 31, prefix=300)
    out, usage = generate(cluster, follow, worker=0)
    after, _ = store_stats(cluster, 0)
    assert usage.cached_tokens == 0 and out == reference(follow)
    assert after["ssd"].corrupt == before["ssd"].corrupt + 1
    assert after["redis"].corrupt == before["redis"].corrupt + 1


def test_requests_go_on_while_redis_is_down_and_it_is_used_again_after(cluster, reference,
                                                                       redis_server):
    redis_server.stop()
    try:
        down = prompt(4, 40, prefix=300)
        out, _ = generate(cluster, down, worker=0)
        assert out == reference(down)
        wait_for_writes(cluster)
        tiers, _ = store_stats(cluster, 0)
        assert not tiers["redis"].healthy
    finally:
        redis_server.start()
    client = RedisTier(redis_server.url, 1).client
    deadline = time.monotonic() + 60
    for seed in range(50, 100):  # new prompts until one lands in Redis (the tier backs off)
        ids = prompt(seed, seed, prefix=260)
        out, _ = generate(cluster, ids, worker=0)
        assert out == reference(ids)
        wait_for_writes(cluster)
        if client.exists(cluster.server.router.kv_index.prefix_keys(ids)[0]):
            break
        assert time.monotonic() < deadline, "the Redis tier was never used again"
    assert store_stats(cluster, 0)[0]["redis"].healthy


def test_requests_with_another_cache_salt_share_no_stored_kv(cluster, reference):
    generate(cluster, prompt(5, 50), worker=0, salt="tenant-a")
    wait_for_writes(cluster)
    # Neither the first worker's own tiers nor Redis serve it to another salt, or to none
    # (each probe is the first of its salt: it then publishes under that salt itself).
    for worker, salt, tail in ((0, "tenant-b", 51), (1, "tenant-c", 52), (0, None, 53)):
        out, usage = generate(cluster, prompt(5, tail), worker=worker, salt=salt)
        assert usage.cached_tokens == 0 and out == reference(prompt(5, tail))
    out, usage = generate(cluster, prompt(5, 54), worker=0, salt="tenant-a")
    assert usage.cached_tokens == 768 and out == reference(prompt(5, 54))


def test_a_wrong_redis_password_leaves_the_tier_unhealthy_and_requests_served(
        ray_cluster, reference, tmp_path, cluster):
    from tandem.cluster.redis_server import RedisServer

    from .serving import ServerThread

    cluster.close()  # one cluster at a time on 2 cores
    redis = RedisServer(64 << 20, password="right").start()
    running = None
    try:
        running = ServerThread(serve_config(worker={"kv_store": {
            "ssd_dir": str(tmp_path), "redis": {"url": redis.url, "password": "wrong"}}}))
        ids = prompt(7, 70, prefix=300)
        out, usage = generate(running, ids)
        assert out == reference(ids) and usage.cached_tokens == 0
        wait_for_writes(running)
        tiers, _ = store_stats(running, 0)
        assert not tiers["redis"].healthy and "password" in tiers["redis"].error
    finally:
        if running is not None:
            running.close()
        redis.close()
