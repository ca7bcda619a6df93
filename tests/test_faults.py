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
