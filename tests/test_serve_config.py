"""`ServeConfig`: YAML plus flag overrides, validated once; unknown keys are errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tandem.cluster.config import ServeConfig


def test_defaults_are_the_one_machine_setup():
    c = ServeConfig()
    assert (c.prefill_workers, c.decode_workers, c.colocated) == (1, 1, False)
    assert (c.gateway.host, c.gateway.port) == ("127.0.0.1", 50051)
    assert c.worker.engine.num_threads == 1 and c.worker.kv_transport == "auto"
    assert c.model_id == "smollm2-135m-instruct"


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("decode_workers: 3\ngateway:\n  port: 6000\nworker:\n  engine:\n"
                    "    dtype: float32\n")
    c = ServeConfig.load(path, {"gateway.port": 0, "worker.engine.kv_cache_gb": 0.5})
    assert c.decode_workers == 3 and c.gateway.port == 0
    assert c.worker.engine.dtype == "float32" and c.worker.engine.kv_cache_gb == 0.5


@pytest.mark.parametrize("text", ["decode_worker: 2\n", "gateway:\n  prot: 1\n",
                                  "prefill_workers: 0\n", "worker:\n  kv_transport: smoke\n",
                                  "worker:\n  kv_codec: zip\n",
                                  "worker:\n  kv_codec: cachegen:9\n",
                                  "worker:\n  kv_store:\n    ssd_codec: cachegen:auto\n"])
def test_unknown_or_bad_keys_are_errors(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValidationError):
        ServeConfig.load(path)


def test_kv_store_settings_come_from_the_file_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("worker:\n  kv_store:\n    cpu_gb: 0.5\n    redis:\n"
                    "      url: redis://10.0.0.5:6379/0\n      password: pw\n")
    c = ServeConfig.load(path, {"worker.kv_store.ssd_dir": tmp_path / "kv",
                                "worker.kv_store.chunk_tokens": 512})
    store = c.worker.kv_store
    assert store.enabled and store.cpu_gb == 0.5 and store.chunk_tokens == 512
    assert store.redis.url == "redis://10.0.0.5:6379/0" and store.redis.password == "pw"
    assert store.ssd_root == tmp_path / "kv"


def test_codecs_are_set_per_tier_and_for_the_wire():
    c = ServeConfig.load(None, {"worker.kv_codec": "cachegen:auto",
                                "worker.kv_store.ssd_codec": "cachegen:3"})
    assert c.worker.kv_codec == "cachegen:auto" and c.worker.kv_store.ssd_codec == "cachegen:3"
    assert ServeConfig().worker.kv_store.redis.codec == "cachegen"  # CacheGen by default


def test_chunks_must_be_whole_kv_blocks():
    with pytest.raises(ValidationError, match=r"multiple of engine\.block_size"):
        ServeConfig.load(None, {"worker.kv_store.chunk_tokens": 100})


def test_config_is_frozen():
    with pytest.raises(ValidationError):
        ServeConfig().prefill_workers = 4
