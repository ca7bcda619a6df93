"""Choosing the KV transport: `auto` takes NIXL where both ends have it and falls back to gRPC
with a reason; a missing or broken NIXL is one clear message, at start-up, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tandem import transfer
from tandem.transfer import (
    TransportNotUsable,
    available_transports,
    choose_receiver,
    nixl_problem,
)
from tandem.transfer.base import ReceiverInfo

NIXL = ReceiverInfo("nixl", "agent-1", b"...")
GRPC = ReceiverInfo("grpc", "10.0.0.2:4000")


@pytest.fixture
def broken_nixl(monkeypatch, tmp_path):
    """NIXL that fails at import, as a broken install (a missing .so) does."""
    package = tmp_path / "nixl"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise ImportError('libnixl.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "nixl" or m.startswith("nixl.")]:
        monkeypatch.delitem(sys.modules, name)
    nixl_problem.cache_clear()
    yield tmp_path
    nixl_problem.cache_clear()


def test_auto_prefers_nixl_when_both_ends_have_it():
    assert choose_receiver(("nixl", "grpc"), (NIXL, GRPC)) == (NIXL, None)


def test_auto_falls_back_to_grpc_when_the_decode_worker_lacks_nixl():
    receiver, reason = choose_receiver(("nixl", "grpc"), (GRPC,))
    assert receiver == GRPC and "offers grpc, not nixl" in reason


def test_auto_falls_back_to_grpc_when_this_worker_lacks_nixl(broken_nixl):
    assert available_transports("auto") == ("grpc",)
    receiver, reason = choose_receiver(available_transports("auto"), (NIXL, GRPC))
    assert receiver == GRPC and "nixl is not available on this worker" in reason
    assert "libnixl.so" in reason


def test_no_common_transport_is_an_error():
    with pytest.raises(TransportNotUsable, match="no common KV transport"):
        choose_receiver(("nixl",), (GRPC,))


def test_forcing_a_broken_nixl_names_the_problem_and_the_fix(broken_nixl):
    with pytest.raises(TransportNotUsable) as err:
        available_transports("nixl")
    message = str(err.value)
    assert "libnixl.so" in message and "pip install --no-deps nixl==1.5.1" in message
    with pytest.raises(TransportNotUsable):
        transfer.make_transport("nixl")


def test_serve_with_a_broken_nixl_stops_with_one_line(broken_nixl):
    env = {"PYTHONPATH": str(broken_nixl), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "tandem.cli", "serve", "--kv-transport", "nixl"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --kv-transport nixl: NIXL is not usable")
    assert "Traceback" not in done.stderr
