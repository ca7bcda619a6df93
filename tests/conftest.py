"""Shared fixtures: the shipped model is loaded once per session (fp32 and bf16)."""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("UCX_NET_DEVICES", "lo")  # NIXL/UCX traffic never leaves loopback
warnings.filterwarnings("ignore", message=".*not writable.*")

torch = pytest.importorskip("torch")

from tandem.engine.config import EngineConfig  # noqa: E402
from tandem.engine.engine import LLMEngine  # noqa: E402
from tandem.engine.loader import LoadedModel, load_model, resolve_model_path  # noqa: E402
from tandem.engine.sampling_params import SamplingParams  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def model_path() -> Path:
    return resolve_model_path(None)


@pytest.fixture(scope="session")
def loaded_fp32() -> LoadedModel:
    return load_model(None, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="session")
def loaded_bf16() -> LoadedModel:
    return load_model(None, torch.bfloat16, torch.device("cpu"))


@pytest.fixture
def make_engine(loaded_fp32: LoadedModel):
    """Build fp32 engines over the shared weights; config fields as keyword arguments."""

    def make(**overrides) -> LLMEngine:
        settings = {"dtype": "float32", "kv_cache_gb": 0.1} | overrides
        return LLMEngine(EngineConfig(**settings), loaded=loaded_fp32)

    return make


@pytest.fixture(scope="session")
def hf_model(model_path: Path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_path.parent, gguf_file=model_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(model_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)


def require_nixl() -> None:
    """Skip a NIXL test where NIXL is not installed; fail it where NIXL is installed but does
    not load, so a broken install is never counted as a skip (`make install` installs it)."""
    from tandem.transfer import nixl_problem

    problem = nixl_problem()
    if problem is None:
        return
    if importlib.util.find_spec("nixl") is not None:
        pytest.fail(f"NIXL is installed but broken: {problem}")
    pytest.skip(problem)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def run_to_completion(engine: LLMEngine, prompts: list[list[int]], params) -> list[list[int]]:
    """Generate for every prompt in one engine (batched); output token ids in prompt order."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, prompt, p in zip(ids, prompts, params, strict=True):
        engine.add_request(rid, prompt, p)
    done: dict[str, list[int]] = {}
    for _ in range(10_000):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        if len(done) == len(ids):
            return [done[rid] for rid in ids]
    raise AssertionError("engine did not finish")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session, advertising every worker pool's resource."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             resources={"tandem_prefill": 8, "tandem_decode": 8, "tandem_colocated": 8,
                        "tandem_memory": 8})
    yield ray
    ray.shutdown()


_TEST_KV_DIR = tempfile.mkdtemp(prefix="tandem-test-kv-")


def serve_config(**overrides):
    """A small fp32 cluster config (fp32 so outputs can be compared exactly to one engine); its
    KV store keeps the SSD tier in a temporary directory and starts no Redis."""
    from tandem.cluster.config import ServeConfig

    settings = {
        "gateway": {"port": 0, "http_port": 0},
        "worker": {"engine": {"dtype": "float32", "kv_cache_gb": 0.05, "num_threads": 1},
                   "kv_store": {"ssd_dir": _TEST_KV_DIR, "redis": {"embedded": False}}},
    }
    return ServeConfig.model_validate(_merged(settings, overrides))


def _merged(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


@pytest.fixture(scope="session")
def server(ray_cluster):
    """The disaggregated cluster: 1 prefill + 1 decode worker, gRPC handoff, gateway."""
    from .serving import ServerThread

    running = ServerThread(serve_config())
    yield running
    running.close()


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free loopback port for the session."""
    from tandem.cluster.redis_server import RedisServer, find_redis_server

    if find_redis_server() is None:
        pytest.fail("redis-server is not installed: apt-get install redis-server "
                    "(make install does it)")
    server = RedisServer(256 << 20).start()
    yield server
    server.close()
