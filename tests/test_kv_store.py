"""The tiered KV store on real tiers: host memory, files, and a real redis-server."""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading

import pytest
import torch

from tandem.cluster.redis_server import RedisServer
from tandem.engine.kv_cache import KVBlocks, KVSpec
from tandem.kv_store import health
from tandem.kv_store.codec import get_codec
from tandem.kv_store.kv_object import encode_object
from tandem.kv_store.store import TieredStore
from tandem.kv_store.tiers.base import Tier
from tandem.kv_store.tiers.memory import MemoryTier
from tandem.kv_store.tiers.redis import RedisTier
from tandem.kv_store.tiers.ssd import SsdTier

SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_size=4)
CHUNK = 8
SIZE = len(encode_object(KVBlocks(SPEC, CHUNK, torch.zeros(3, 2, 2, 4, 2, 8,
                                                           dtype=torch.bfloat16)),
                         "fp", get_codec("raw")))


def cap(objects: int) -> int:
    """A capacity that holds `objects` objects (their JSON headers vary by a few bytes)."""
    return objects * SIZE + SIZE // 2


def kv(seed: int, num_tokens: int = CHUNK) -> KVBlocks:
    g = torch.Generator().manual_seed(seed)
    shape = (3, 2, SPEC.num_blocks_for(num_tokens), 4, 2, 8)
    return KVBlocks(SPEC, num_tokens, torch.randn(shape, generator=g).to(torch.bfloat16))


def same(a: KVBlocks | None, b: KVBlocks) -> bool:
    return a is not None and torch.equal(a.data.view(torch.int16), b.data.view(torch.int16))


@pytest.fixture
def redis_tier(redis_server):
    tier = RedisTier(redis_server.url, 64 << 20, part_bytes=1000)
    tier.client.flushall()
    yield tier
    tier.close()


def make_store(tiers: list[Tier], **options) -> TieredStore:
    return TieredStore(tiers, "fp", SPEC, chunk_tokens=CHUNK, **options)


# -- every tier behaves the same -----------------------------------------------------------------


@pytest.fixture(params=["cpu", "ssd", "redis"])
def tier(request, tmp_path) -> Tier:
    if request.param == "cpu":
        return MemoryTier("cpu", 1 << 20)
    if request.param == "ssd":
        return SsdTier(tmp_path, 1 << 20)
    return request.getfixturevalue("redis_tier")


def test_tier_round_trips_bytes_and_ranges(tier):
    data = bytes(range(256)) * 20  # 5,120 bytes: several Redis parts
    assert tier.get("tdkv:a") is None and not tier.contains("tdkv:a")
    tier.put("tdkv:a", data)
    assert tier.contains("tdkv:a")
    assert bytes(tier.get("tdkv:a")) == data
    assert bytes(tier.get_range("tdkv:a", 990, 1030)) == data[990:2020]
    assert bytes(tier.get_range("tdkv:a", 5000, 500)) == data[5000:]
    tier.remove("tdkv:a")
    assert tier.get("tdkv:a") is None and not tier.contains("tdkv:a")


def test_ssd_tier_finds_its_objects_again_after_a_restart(tmp_path):
    SsdTier(tmp_path, 1 << 20).put("tdkv:a", b"x" * 100)
    (tmp_path / ".tmp-leftover").write_bytes(b"half a write")
    reopened = SsdTier(tmp_path, 1 << 20)
    assert bytes(reopened.get("tdkv:a")) == b"x" * 100 and reopened.used_bytes == 100
    assert not (tmp_path / ".tmp-leftover").exists()


def test_an_ssd_directory_serves_one_process_at_a_time(tmp_path):
    from tandem.kv_store.errors import TierUnavailable

    first = SsdTier(tmp_path, 1 << 20)
    with pytest.raises(TierUnavailable, match="in use by another process"):
        SsdTier(tmp_path, 1 << 20)
    first.close()
    SsdTier(tmp_path, 1 << 20).close()


# -- the store ------------------------------------------------------------------------------------


def test_lru_objects_are_demoted_down_the_tiers_and_dropped_at_the_last(tmp_path):
    cpu, ssd = MemoryTier("cpu", cap(2)), SsdTier(tmp_path, cap(3))
    store = make_store([cpu, ssd], promote_on_hit=False)
    objects = {f"k{i}": kv(i) for i in range(6)}
    for key, value in objects.items():
        store.put(key, value)
    store.flush()
    assert cpu.stored_keys() == ["k4", "k5"]
    assert ssd.stored_keys() == ["k1", "k2", "k3"]
    assert store.get("k0") is None  # dropped from the last tier
    assert all(same(store.get(k), objects[k]) for k in ("k1", "k5"))
    stats = {t.name: t for t in store.stats().tiers}
    assert stats["cpu"].evictions == 4 and stats["ssd"].evictions == 1
    assert cpu.used_bytes <= cpu.capacity_bytes and ssd.used_bytes <= ssd.capacity_bytes
    store.close()


def test_reading_an_object_keeps_it_from_eviction():
    cpu = MemoryTier("cpu", cap(2))
    store = make_store([cpu])
    store.put("k0", kv(0))
    store.put("k1", kv(1))
    store.flush()
    assert store.get("k0") is not None
    store.put("k2", kv(2))
    store.flush()
    assert cpu.stored_keys() == ["k0", "k2"]
    store.close()


@pytest.mark.parametrize("promote", [True, False])
def test_a_lower_tier_hit_is_promoted_when_configured(tmp_path, promote):
    cpu, ssd = MemoryTier("cpu", cap(1)), SsdTier(tmp_path, cap(4))
    store = make_store([cpu, ssd], promote_on_hit=promote)
    store.put("k0", kv(0))
    store.put("k1", kv(1))  # demotes k0 to the SSD
    store.flush()
    assert same(store.get("k0"), kv(0))
    store.flush()
    assert cpu.contains("k0") is promote
    store.close()


def test_writes_go_through_to_redis_where_another_worker_reads_them(redis_server, redis_tier):
    mine = make_store([MemoryTier("cpu", cap(4)), redis_tier])
    other = make_store([MemoryTier("cpu", cap(4)), RedisTier(redis_server.url, 1 << 20)])
    mine.put("k0", kv(0))
    mine.flush()
    assert same(other.get("k0"), kv(0))
    stats = {t.name: t for t in other.stats().tiers}
    assert stats["redis"].hits == 1 and stats["cpu"].misses == 1
    mine.close()
    other.close()


def test_a_layer_group_is_read_alone(tmp_path, redis_tier):
    for tier in (MemoryTier("cpu", cap(4)), SsdTier(tmp_path, cap(4)), redis_tier):
        store = make_store([tier])
        store.put("k0", kv(0))
        store.flush()
        layers = store.get_layers("k0", range(1, 3))
        assert torch.equal(layers.view(torch.int16), kv(0).data[1:3].view(torch.int16))
        store.close()


def test_load_prefix_takes_the_longest_run_of_cached_chunks_and_leaves_a_token():
    store = make_store([MemoryTier("cpu", cap(16))])
    tokens = list(range(100, 130))  # 3 whole chunks of 8, then 6 tokens
    keys = store.prefix_keys(tokens)
    assert len(keys) == 3 and store.prefix_keys(tokens[:8] + [7] * 8)[0] == keys[0]
    assert store.prefix_keys(tokens[:8] + [7] * 8)[1] != keys[1]
    for i in (0, 2):
        store.put(keys[i], kv(i))
    store.flush()
    loaded = store.load_prefix(tokens)
    assert loaded is not None and loaded.num_tokens == CHUNK and same(loaded, kv(0))
    store.put(keys[1], kv(1))
    store.flush()
    assert store.load_prefix(tokens).num_tokens == 24
    assert store.load_prefix(tokens[:24]).num_tokens == 16  # the last token is computed
    store.close()


def test_corrupted_objects_are_deleted_counted_and_read_from_the_next_tier(tmp_path,
                                                                           redis_tier):
    ssd = SsdTier(tmp_path, cap(4))
    store = make_store([ssd, redis_tier], promote_on_hit=False)
    store.put("k0", kv(0))
    store.flush()
    path = next(tmp_path.glob("*.kv"))
    damaged = bytearray(path.read_bytes())
    damaged[-10] ^= 0x01
    path.write_bytes(damaged)
    assert same(store.get("k0"), kv(0))  # the SSD copy failed its check; Redis had a sound one
    assert not ssd.contains("k0") and not path.exists()
    part = redis_tier.client.get("k0#0")
    redis_tier.client.set("k0#0", part[:-1] + bytes([part[-1] ^ 0x01]))
    assert store.get("k0") is None
    assert not redis_tier.contains("k0")
    stats = {t.name: t for t in store.stats().tiers}
    assert stats["ssd"].corrupt == 1 and stats["redis"].corrupt == 1
    store.close()


def test_redis_tier_authenticates_with_its_password():
    server = RedisServer(64 << 20, password="s3cret").start()
    try:
        tier = RedisTier(server.url, 1 << 20, password="s3cret")
        tier.put("tdkv:a", b"abc")
        assert bytes(tier.get("tdkv:a")) == b"abc"
        tier.close()
    finally:
        server.close()


def test_redis_tier_speaks_tls_and_verifies_the_server(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server = RedisServer(64 << 20, tls=(cert, key)).start()
    try:
        assert server.url.startswith("rediss://")
        tier = RedisTier(server.url, 1 << 20, ssl_ca_certs=cert)
        tier.put("tdkv:a", b"abc")
        assert bytes(tier.get("tdkv:a")) == b"abc"
        tier.close()
        unverified = make_store([RedisTier(server.url, 1 << 20)])  # the system CAs: refused
        unverified.put("k0", kv(0))
        unverified.flush()
        assert not {t.name: t for t in unverified.stats().tiers}["redis"].healthy
        unverified.close()
    finally:
        server.close()


def test_wrong_redis_password_marks_the_tier_unhealthy_and_the_store_goes_on(caplog):
    server = RedisServer(64 << 20, password="s3cret").start()
    try:
        cpu = MemoryTier("cpu", cap(4))
        store = make_store([cpu, RedisTier(server.url, 1 << 20, password="wrong")])
        with caplog.at_level(logging.WARNING):
            store.put("k0", kv(0))
            store.flush()
            assert same(store.get("k0"), kv(0))
        redis = {t.name: t for t in store.stats().tiers}["redis"]
        assert not redis.healthy and "password" in redis.error
        assert any("redis tier marked unhealthy" in r.getMessage()
                   and "password" in r.getMessage() for r in caplog.records)
        store.close()
    finally:
        server.close()


def test_redis_down_is_skipped_and_used_again_once_back(monkeypatch):
    monkeypatch.setattr(health, "FIRST_BACKOFF_S", 0.05)
    server = RedisServer(64 << 20).start()
    try:
        redis = RedisTier(server.url, 1 << 20)
        store = make_store([MemoryTier("cpu", cap(1)), redis])
        server.stop()
        store.put("k0", kv(0))
        store.flush()
        assert same(store.get("k0"), kv(0))  # the CPU tier still serves
        assert not {t.name: t for t in store.stats().tiers}["redis"].healthy
        server.start()
        deadline = threading.Event()
        for _ in range(100):  # the probe backs off between tries
            if store.health["redis"].usable():
                break
            deadline.wait(0.05)
        store.put("k1", kv(1))
        store.flush()
        assert redis.contains("k1")
        assert {t.name: t for t in store.stats().tiers}["redis"].healthy
        store.close()
    finally:
        server.close()


def test_a_full_ssd_stops_taking_writes_with_a_warning(tmp_path, monkeypatch, caplog):
    from tandem.kv_store.tiers import ssd as ssd_module

    ssd = SsdTier(tmp_path / "ssd", cap(4))
    cpu = MemoryTier("cpu", cap(1))
    store = make_store([cpu, ssd])
    store.put("k0", kv(0))
    store.flush()

    def full_disk(path, mode):  # every write fails with ENOSPC, like a full disk
        return open("/dev/full", mode)

    monkeypatch.setattr(ssd_module, "open", full_disk, raising=False)
    with caplog.at_level(logging.WARNING):
        store.put("k1", kv(1))  # demotes k0: the SSD is full, so it is dropped
        store.flush()
    assert any("is full" in r.getMessage() for r in caplog.records)
    assert {t.name: t for t in store.stats().tiers}["ssd"].writes_paused
    assert same(store.get("k1"), kv(1)) and store.get("k0") is None
    store.close()


def test_a_full_write_queue_drops_writes_instead_of_blocking():
    release = threading.Event()

    class SlowTier(MemoryTier):
        def put(self, key, data):
            release.wait(10)
            super().put(key, data)

    store = make_store([SlowTier("cpu", cap(8))], max_pending_writes=1)
    accepted = [store.put(f"k{i}", kv(i)) for i in range(4)]
    release.set()
    store.flush()
    assert accepted[0] and not all(accepted)
    assert store.stats().puts_dropped == accepted.count(False)
    store.close()


def test_index_log_reports_local_keys_as_changes():
    cpu = MemoryTier("cpu", cap(2))
    store = make_store([cpu])
    store.put("k0", kv(0))
    store.put("k1", kv(1))
    store.flush()
    first = store.index.changes_since(0)
    assert sorted(first.added) == ["k0", "k1"] and not first.full
    store.put("k2", kv(2))  # evicts k0
    store.flush()
    later = store.index.changes_since(first.version)
    assert later.added == ["k2"] and later.removed == ["k0"]
    assert sorted(store.index.changes_since(10**6).added) == ["k1", "k2"]  # unknown: full
    store.close()


def test_keys_are_namespaced_by_model_and_layout_and_chunk_keys_ignore_position():
    from tandem.kv_store import keys

    ns = keys.namespace("fp", SPEC)
    assert ns != keys.namespace("other-model", SPEC)
    assert ns != keys.namespace("fp", SPEC.model_copy(update={"dtype": "float16"}))
    a, b = list(range(8)), list(range(8, 16))
    assert keys.prefix_keys(ns, a + b, 8)[1] != keys.prefix_keys(ns, [9] * 8 + b, 8)[1]
    assert keys.chunk_key(ns, b) == keys.chunk_key(ns, list(b))
    assert keys.chunk_key(ns, b) != keys.chunk_key(ns, a)
    assert keys.chunk_key(ns, b).startswith(f"tdkv:{ns}:c:")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tier_keeps_objects_in_device_memory():
    tier = MemoryTier("gpu", 1 << 20, "cuda")
    tier.put("tdkv:a", b"abc" * 100)
    assert bytes(tier.get("tdkv:a")) == b"abc" * 100
    store = make_store([tier, MemoryTier("cpu", cap(4))])
    store.put("k0", kv(0))
    store.flush()
    got = store.get("k0")
    assert got.data.device.type == "cuda"  # decoded where it lies: no round trip via the host
    assert same(KVBlocks(got.spec, got.num_tokens, got.data.cpu()), kv(0)) and tier.contains("k0")


def test_gpu_tier_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(ValueError, match="needs CUDA"):
        MemoryTier("gpu", 1 << 20, "cuda")


def test_a_file_deleted_behind_the_stores_back_is_a_miss_and_leaves_the_index(tmp_path):
    ssd = SsdTier(tmp_path, cap(4))
    store = make_store([ssd])
    store.put("k0", kv(0))
    store.flush()
    version = store.index.changes_since(0).version
    next(tmp_path.glob("*.kv")).unlink()
    assert store.get("k0") is None and not ssd.contains("k0")
    assert store.index.changes_since(version).removed == ["k0"]
    store.close()


def test_a_redis_out_of_memory_pauses_writes_but_keeps_reads(redis_server, redis_tier):
    store = make_store([redis_tier])
    store.put("k0", kv(0))
    store.flush()
    redis_tier.client.config_set("maxmemory-policy", "noeviction")
    redis_tier.client.config_set("maxmemory", "1")
    try:
        store.put("k1", kv(1))
        store.flush()
        stats = {t.name: t for t in store.stats().tiers}["redis"]
        assert stats.healthy and stats.writes_paused
        assert same(store.get("k0"), kv(0))
    finally:
        redis_tier.client.config_set("maxmemory", str(redis_server.maxmemory_bytes))
        redis_tier.client.config_set("maxmemory-policy", "allkeys-lru")
    store.close()


def test_the_controller_recomputes_instead_of_loading_from_a_slow_tier():
    import time

    class SlowTier(MemoryTier):
        def get(self, key):
            time.sleep(0.05)  # ~40 KB/s for these small objects
            return super().get(key)

    store = make_store([SlowTier("slow", cap(8))])
    tokens = list(range(100, 125))
    for i, key in enumerate(store.prefix_keys(tokens)):
        store.put(key, kv(i))
    store.flush()
    fast = store.load_prefix(tokens, recompute_s_per_token=1.0)  # recomputing is slower
    assert fast.num_tokens == 24
    slow = store.load_prefix(tokens, recompute_s_per_token=1e-5)  # the first read measured it
    assert slow is None
    assert store.stats().controller == {"slow:raw": 3, "text": 1}
    store.close()


def test_chunk_caches_round_trip_by_layer_through_every_tier_and_refuse_a_wrong_length(
        tmp_path, redis_tier):
    from tandem.kv_store.chunk_cache import StoreChunkCache

    writer = StoreChunkCache(make_store([MemoryTier("cpu", cap(4)), redis_tier]))
    tokens = [5, 6, 7, 8, 9, 10]  # not a whole number of blocks
    chunk = torch.randn(3, 2, len(tokens), 2, 8).to(torch.bfloat16)
    assert not writer.contains(tokens)
    writer.put(tokens, chunk)
    writer.store.flush()
    # Another worker, with only the shared tier: reads each layer from Redis.
    reader = StoreChunkCache(make_store([MemoryTier("cpu", cap(4)), redis_tier]))
    assert writer.contains(tokens) and reader.contains(tokens)
    for layer in range(3):
        assert torch.equal(writer.layer(tokens, layer), chunk[layer])
        assert torch.equal(reader.layer(tokens, layer), chunk[layer])
    assert writer.store.stats().tiers[0].hits == 1  # one chunk read, one hit, for all layers
    # A stored chunk of another length under that key is damaged: deleted and counted.
    writer.store.put(writer.key(tokens[:5]), kv(1, 6))
    writer.store.flush()
    assert writer.layer(tokens[:5], 0) is None
    assert writer.store.stats().tiers[0].corrupt == 1
