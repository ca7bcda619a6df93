"""Block bookkeeping and scheduling without a model."""

from __future__ import annotations

from tandem.engine.block_manager import BlockManager
from tandem.engine.config import EngineConfig
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.scheduler import Scheduler
from tandem.engine.sequence import Sequence


def seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, list(tokens), len(tokens), SamplingParams())


def finish_prefill(bm: BlockManager, s: Sequence) -> None:
    assert bm.grow(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.register_full_blocks(s)


def test_prefix_blocks_are_shared_and_confirmed_by_tokens():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = seq("a", list(range(10)))
    finish_prefill(bm, a)
    b = seq("b", [*range(8), 99, 98])
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:2]
    bm.take_prefix(b, hits)
    assert b.num_computed_tokens == 8 and bm.ref_counts[hits[0]] == 2
    c = seq("c", [0, 1, 2, 7, 4, 5, 6, 7, 8])  # differs inside the first block: no hit
    assert bm.match_prefix(c) == []


def test_a_hit_always_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = seq("a", list(range(8)))
    finish_prefill(bm, a)
    assert len(bm.match_prefix(seq("b", list(range(8))))) == 1


def test_freed_blocks_stay_hittable_until_reused_least_recent_first():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = seq("a", [1, 2, 3, 4, 5])
    finish_prefill(bm, a)
    bm.free_blocks(a)
    assert bm.num_free_blocks == 4
    assert len(bm.match_prefix(seq("b", [1, 2, 3, 4, 9]))) == 2
    d = seq("d", [7, 7])
    assert bm.grow(d, 8)  # takes every block: the cached ones are recycled
    assert bm.match_prefix(seq("e", [1, 2, 3, 4, 9])) == []


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a = seq("a", list(range(10)))
    finish_prefill(bm, a)
    assert bm.match_prefix(seq("b", list(range(10)))) == []


def test_scheduler_spends_the_token_budget_decodes_first():
    config = EngineConfig(max_num_batched_tokens=16, max_num_seqs=4, block_size=4)
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(config, bm)
    decoding = seq("dec", [1, 2, 3])
    sched.add(decoding)
    first = sched.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in first] == [("dec", 3)]
    decoding.num_computed_tokens = 3
    decoding.token_ids.append(4)
    sched.add(seq("long", list(range(40))))
    second = sched.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in second] == [("dec", 1), ("long", 15)]


def test_scheduler_preempts_the_newest_sequence_when_blocks_run_out():
    config = EngineConfig(max_num_batched_tokens=64, max_num_seqs=4, block_size=4)
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(config, bm)
    old, new = seq("old", [1] * 8), seq("new", [2] * 8)
    sched.add(old)
    sched.add(new)
    assert len(sched.schedule()) == 2 and bm.num_free_blocks == 0
    for s in (old, new):
        s.num_computed_tokens = 8
        s.token_ids.append(3)
    batch = sched.schedule()  # old needs a third block: new is evicted
    assert [c.seq.request_id for c in batch] == ["old"]
    assert sched.num_preemptions == 1 and new.num_computed_tokens == 0
    assert sched.waiting[0] is new and not new.block_table


def test_blocks_freed_together_come_back_as_one_ascending_run():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = seq("a", list(range(16)))
    assert bm.grow(a, 16) and a.block_table == [0, 1, 2, 3]
    b = seq("b", list(range(16)))
    assert bm.grow(b, 16)
    bm.free_blocks(a)  # back on the free list tail first
    bm.free_blocks(b)
    c = seq("c", list(range(32)))
    assert bm.grow(c, 32)
    # one run per freed sequence, so a transfer into c moves two contiguous ranges
    assert c.block_table == [0, 1, 2, 3, 4, 5, 6, 7]
