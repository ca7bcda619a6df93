"""CacheGen's streaming controller: finer levels when bandwidth allows, coarser as it drops,
recomputing from text when that is faster."""

from __future__ import annotations

from tandem.kv_store.codec.controller import TEXT, BandwidthMeter, StreamingController

# bytes per token of each level (finest first), as measured on SmolLM2-135M (bf16: 23,040)
SIZES = {"cachegen:0": 14_600, "cachegen:1": 10_800, "cachegen:2": 8_350, "cachegen:3": 6_870,
         "cachegen:4": 5_310}
RECOMPUTE_S_PER_TOKEN = 0.004  # one CPU thread


def choose(bandwidth_bps: float, budget_s: float = 0.5, recompute=RECOMPUTE_S_PER_TOKEN) -> str:
    return StreamingController().choose(SIZES, 256, bandwidth_bps, budget_s, recompute).option


def test_levels_get_coarser_as_bandwidth_drops():
    # 256 tokens in 0.5 s: level 0 needs 7.5 MB/s, level 4 2.7 MB/s
    picks = [choose(bw) for bw in (1e9, 7e6, 5e6, 3.8e6, 3e6)]
    assert picks == list(SIZES)


def test_very_low_bandwidth_recomputes_from_text():
    assert choose(1e5) == TEXT
    assert choose(1e5, recompute=None) == "cachegen:4"  # no text option: the smallest


def test_text_wins_when_it_is_both_in_budget_and_faster():
    assert choose(2e6, budget_s=2.0, recompute=0.0001) == TEXT
    assert choose(1e9, budget_s=2.0, recompute=0.0001) == "cachegen:0"


def test_choices_are_counted_and_bandwidth_is_measured():
    controller = StreamingController()
    for bandwidth in (1e9, 1e9, 1e5):
        controller.choose(SIZES, 256, bandwidth, 0.5, RECOMPUTE_S_PER_TOKEN)
    assert controller.choices == {"cachegen:0": 2, TEXT: 1}
    meter = BandwidthMeter(1e9, weight=0.5)
    meter.observe(1_000_000, 0.01)  # the first measurement replaces the guess
    meter.observe(3_000_000, 0.01)
    assert meter.bps == (1e8 + 3e8) / 2
