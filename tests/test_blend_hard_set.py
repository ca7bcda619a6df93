"""The hard chunk-reuse set (bench/blend_hard_data.py) is what the Cache-Craft issue asks for:
96 items, the answer passage at every position equally often, distractors stating the same
kinds of facts about other towns, and history prompts whose orders never equal an item's."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"


@pytest.fixture(scope="module")
def sets():
    sys.path.insert(0, str(BENCH))
    try:
        from blend_eval import paired_bootstrap
        from blend_hard_data import hard_sets
    finally:
        sys.path.remove(str(BENCH))
    from tandem.engine.loader import load_tokenizer

    tokenizer, _ = load_tokenizer(None)
    items, history = hard_sets(lambda t: len(tokenizer.encode(t, add_special_tokens=False)))
    return items, history, paired_bootstrap


def test_the_hard_set_balances_the_answer_position_over_96_items(sets):
    items, _, _ = sets
    assert len(items) == 96
    assert Counter(e["answer_chunk"] for e in items) == {p: 16 for p in range(6)}
    for e in items:
        assert e["answer"] in e["chunks"][e["answer_chunk"]]


def test_every_distractor_states_a_fact_of_the_asked_kind_about_another_town(sets):
    items, _, _ = sets
    for e in items:
        key = e["answer_prefix"]  # "The keeper of the <town> bell tower is"
        town = next(w for w in key.split() if w[0].isupper() and w != "The")
        template = key.replace(town, "{town}")
        others = [c for i, c in enumerate(e["chunks"]) if i != e["answer_chunk"]]
        assert all(town not in c for c in others)
        for chunk in others:
            other_town = chunk.split()[0]
            assert template.format(town=other_town) in chunk


def test_history_prompts_never_repeat_an_evaluation_order(sets):
    items, history, _ = sets
    assert len(history) == 96
    assert not {tuple(h["order"]) for h in history} & {tuple(e["order"]) for e in items}


def test_the_paired_bootstrap_interval_holds_the_mean_difference(sets):
    _, _, paired_bootstrap = sets
    a, b = [1.0] * 30 + [0.0] * 10, [1.0] * 20 + [0.0] * 20
    mean, low, high = paired_bootstrap(a, b)
    assert mean == pytest.approx(0.25) and low < mean < high and low > 0
    assert paired_bootstrap([1.0, 0.0], [1.0, 0.0]) == (0.0, 0.0, 0.0)
