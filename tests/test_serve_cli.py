"""`tandem serve` as a user runs it, and the client SDK installed on its own in a fresh venv."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tandem.client import Client
from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.llm import LLM
from tandem.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def expected(loaded_fp32) -> list[int]:
    llm = LLM.from_engine(LLMEngine(EngineConfig(dtype="float32", kv_cache_gb=0.1),
                                    loaded=loaded_fp32))
    return llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0))[0].token_ids


def _lines(stream, sink: queue.Queue) -> None:
    for line in stream:
        sink.put(line)


def test_serve_colocated_prints_ready_serves_and_drains_on_sigterm(ray_cluster, expected,
                                                                     tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("prefill_workers: 1\ndecode_workers: 1\n"
                      "gateway:\n  shutdown_grace_s: 120\n"
                      "worker:\n  engine:\n    dtype: float32\n    kv_cache_gb: 0.05\n")
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [str(BIN / "tandem"), "serve", "--config", str(config), "--colocated",
         "--grpc-port", "0", "--http-port", "0", "--ray-address", address, "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=os.environ | {"RAY_AUTH_MODE": "disabled"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        deadline, seen = time.monotonic() + 300, []
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            seen.append(line)
            if line.startswith("ready grpc="):
                break
            assert proc.poll() is None, "".join(seen)
        fields = dict(word.split("=", 1) for word in line.split()[1:])
        with Client(fields["grpc"], timeout=120) as client:
            out = client.generate(PROMPT, max_tokens=8, temperature=0)
        assert out.token_ids == expected
        assert httpx.get(f"http://{fields['http']}/health", timeout=30).json() == \
            {"status": "ok"}
        # start-up progress on stderr (plain lines when it is not a terminal)
        assert any("loading the model in each worker (2/2)" in s for s in seen), "".join(seen)
        assert not any("Token authentication" in s for s in seen)
        # SIGTERM mid-stream: /health says 503 and new requests are refused while the running
        # stream finishes; then the server exits.
        health, refused, got = [], [], []
        with Client(fields["grpc"], timeout=120) as client:
            for chunk in client.stream(PROMPT, max_tokens=60, temperature=0, ignore_eos=True):
                got.extend(chunk.token_ids)
                if len(got) >= 4 and not health:
                    proc.send_signal(signal.SIGTERM)
                    while not health or health[-1] != 503:
                        health.append(httpx.get(f"http://{fields['http']}/health",
                                                timeout=30).status_code)
                    refused.append(httpx.post(
                        f"http://{fields['http']}/v1/completions", timeout=30,
                        json={"model": "smollm2-135m-instruct", "prompt": PROMPT}).status_code)
                if chunk.finish_reason:
                    assert chunk.finish_reason == "length"
        assert len(got) == 60 and got[:8] == expected  # the stream was not cut
        assert health[-1] == 503 and refused == [503]
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_client_installed_without_extras_talks_to_the_gateway(server, expected, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "tandem", src / "tandem",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(src)], check=True,
                   timeout=600)
    script = (
        "import json, sys\n"
        "from tandem.client import Client\n"
        f"c = Client({server.address!r}, timeout=120)\n"
        f"out = c.generate({PROMPT!r}, max_tokens=8, temperature=0)\n"
        f"chunks = list(c.stream({PROMPT!r}, max_tokens=8, temperature=0))\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'numpy') if m in sys.modules)\n"
        "print(json.dumps({'ids': out.token_ids, 'stream_ids': [t for ch in chunks "
        "for t in ch.token_ids], 'health': c.health(), 'heavy': heavy}))\n")
    done = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"ids": expected, "stream_ids": expected, "health": True, "heavy": []}
    missing = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"],
                             capture_output=True, timeout=60)
    assert missing.returncode != 0  # the base install really has no torch
