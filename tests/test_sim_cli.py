"""`tandem simulate` and `tandem profile` from the command line."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tandem.cli import app
from tandem.cluster.profile import PROFILE_VERSION, ReplicaProfile


def test_simulate_prints_one_json_object_and_writes_a_plot(tmp_path):
    plot = tmp_path / "run.png"
    result = CliRunner().invoke(app, [
        "simulate", "--rate", "20", "--duration", "60", "--prompt", "512", "--output", "32",
        "--autoscale", "--plot", str(plot), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])["run"]
    assert summary["finished"] + summary["failed"] == summary["requests"] > 0
    assert 0 <= summary["attainment"] <= 1 and summary["gpu_hours"] > 0
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_simulate_refuses_a_bad_option_with_its_name():
    result = CliRunner().invoke(app, ["simulate", "--rate", "1", "--layout", "sideways"])
    assert result.exit_code != 0
    assert "layout" in result.output


def test_profile_measures_this_machine_into_a_versioned_profile(tmp_path):
    out = tmp_path / "profile.json"
    result = CliRunner().invoke(app, [
        "profile", "--out", str(out), "--prompt-lengths", "32,64", "--batches", "1,2",
        "--contexts", "32"])
    assert result.exit_code == 0, result.output
    profile = ReplicaProfile.load(out)
    assert profile.version == PROFILE_VERSION == json.loads(out.read_text())["version"]
    assert [p.prompt_tokens for p in profile.prefill] == [32, 64]
    assert {(p.batch, p.context) for p in profile.decode} == {(1, 36), (2, 36)}
    assert all(p.step_s > 0 for p in profile.decode)
    assert "grpc" in profile.handoff_bytes_per_s and profile.store_hit_load_s_per_token > 0
    assert profile.kv_capacity_tokens > 0 and profile.startup_s > 0
    assert profile.sources["decode"].startswith("measured")


def test_simulate_tune_reports_the_settings_it_chose(tmp_path):
    result = CliRunner().invoke(app, [
        "simulate", "--rate", "10", "--duration", "60", "--prompt", "512", "--output", "16",
        "--prefill", "2", "--decode", "1", "--autoscale", "--tune", "--json"])
    assert result.exit_code == 0, result.output
    assert "tuned: scale_down_window_s" in result.stderr
    # one line per setting of the grid, then the winner's summary
    assert result.stderr.count("policy scale_down_window_s") == 12
    summary = json.loads(result.stdout.strip().splitlines()[-1])["policy (tuned)"]
    assert summary["finished"] + summary["failed"] == summary["requests"] > 0
