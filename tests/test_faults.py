"""`TANDEM_FAULTS` parsing: inert when unset, strict about names and values."""

from __future__ import annotations

import pytest

from tandem.faults import Faults


def test_unset_means_every_fault_is_off():
    assert Faults.parse("") == Faults()
    assert not Faults.hit(0.0)


def test_pairs_are_parsed_by_dotted_name():
    f = Faults.parse("transfer.delay=0.5, transfer.fail=0.1,step.fail=1")
    assert (f.transfer_delay, f.transfer_fail, f.step_fail) == (0.5, 0.1, 1.0)
    assert Faults.hit(1.0)


@pytest.mark.parametrize(("spec", "match"), [
    ("transfer.explode=1", "transfer.explode=1"),
    ("transfer.delay", "NAME=VALUE"),
    ("transfer.fail=often", "needs a number"),
    ("transfer.fail=2", "less than or equal to 1"),
])
def test_bad_specs_are_errors_naming_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        Faults.parse(spec)


def test_stalls_and_store_faults_are_parsed():
    f = Faults.parse("store.fail=0.5,store.stall=0.25,store.delay=0.1,step.stall=1,"
                     "transfer.stall=0.5,stall.s=3")
    assert (f.store_fail, f.store_stall, f.store_delay) == (0.5, 0.25, 0.1)
    assert (f.step_stall, f.transfer_stall, f.stall_s) == (1.0, 0.5, 3.0)
    assert f.pause(0.1, 1.0) == pytest.approx(3.1)  # the delay plus a stall that was drawn
    assert f.pause(0.1, 0.0) == pytest.approx(0.1)


def test_a_failing_store_read_is_a_miss_not_an_error(monkeypatch, tmp_path):
    from tandem.engine.kv_cache import KVSpec
    from tandem.faults import active_faults
    from tandem.kv_store.config import StoreConfig, open_store

    spec = KVSpec(num_layers=2, num_kv_heads=1, head_dim=8, block_size=16, dtype="float32")
    store = open_store(StoreConfig(cpu_gb=0.01, ssd_gb=0, chunk_tokens=16,
                                   redis={"embedded": False}), "f" * 16, spec, "w0")
    monkeypatch.setenv("TANDEM_FAULTS", "store.fail=1")
    active_faults.cache_clear()
    try:
        assert store.get("any-key") is None  # the tier "failed": a miss, never an exception
        tier = store.stats().tiers[0]
        assert tier.error is not None and "injected store.fail" in tier.error
    finally:
        monkeypatch.delenv("TANDEM_FAULTS")
        active_faults.cache_clear()
