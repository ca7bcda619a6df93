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
                                  "prefill_workers: 0\n", "worker:\n  kv_transport: smoke\n"])
def test_unknown_or_bad_keys_are_errors(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValidationError):
        ServeConfig.load(path)


def test_config_is_frozen():
    with pytest.raises(ValidationError):
        ServeConfig().prefill_workers = 4
