"""An attention worker's KV by token range: a real prefill's KV split over several holders
(one of them holding a single token, one holding nothing) attends, after the exact merge, as
the whole KV does (fp32, every layer); blocks are taken and given back exactly."""

from __future__ import annotations

import pytest
import torch

from tandem.attention_worker.range_kv import RangeKV
from tandem.engine.errors import OutOfBlocksError
from tandem.engine.partial_attention import attend_with_lse, merge_partials

from .conftest import greedy

PROMPT = list(range(500, 550))  # 50 tokens


def prefill_kv(engine) -> torch.Tensor:
    """[layers, 2, tokens, kv_heads, head_dim] of PROMPT, from a real prefill."""
    engine.add_request("p", PROMPT, greedy(1), prefill_only=True)
    while not engine.step():
        pass
    kv = engine.export_kv("p")
    engine.release("p")
    return kv.data.flatten(2, 3)[:, :, :kv.num_tokens]


def test_a_sequence_split_over_holders_attends_as_its_whole_kv(make_engine):
    engine = make_engine()
    spec, cfg = engine.kv_spec, engine.model_config
    kv = prefill_kv(engine)
    ranges = [(0, 20), (20, 21), (21, 50)]
    holders = [RangeKV(spec, 4) for _ in ranges]
    for holder, (lo, hi) in zip(holders, ranges, strict=True):
        holder.open("s", lo)
        slots = holder.grow("s", hi - lo)
        for layer in range(spec.num_layers):
            holder.write(layer, slots, kv[layer, 0, lo:hi], kv[layer, 1, lo:hi])
    nobody = RangeKV(spec, 1)  # asked too, holds nothing of it
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, cfg.num_heads, spec.head_dim, generator=gen)  # "s" and one held nowhere
    scale = spec.head_dim ** -0.5
    for layer in range(spec.num_layers):
        parts = [h.attend(layer, ["s", "absent"], q, scale) for h in (*holders, nobody)]
        out, lse = merge_partials(torch.stack([p[0] for p in parts]),
                                  torch.stack([p[1] for p in parts]))
        keys = kv[layer, 0].transpose(0, 1).unsqueeze(0)  # [1, Hkv, 50, D]
        values = kv[layer, 1].transpose(0, 1).unsqueeze(0)
        want, want_lse = attend_with_lse(q[:1], keys, values, torch.tensor([50]), scale)
        torch.testing.assert_close(out[:1], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[:1], want_lse, atol=1e-5, rtol=1e-5)
        assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    assert holders[2].held_bytes == 29 * spec.bytes_per_token


def test_growing_past_the_pool_takes_nothing_and_freeing_gives_every_block_back(make_engine):
    spec = make_engine().kv_spec
    holder = RangeKV(spec, 3)
    holder.open("a", 0)
    holder.grow("a", spec.block_size + 1)  # two blocks
    with pytest.raises(OutOfBlocksError):
        holder.grow("a", 2 * spec.block_size)  # would need two more
    assert holder.num_free_blocks == 1 and holder.ranges["a"].num_tokens == spec.block_size + 1
    holder.grow("a", spec.block_size - 1)  # fills the second block exactly: no new one
    assert holder.num_free_blocks == 1
    with pytest.raises(ValueError, match="already held"):
        holder.open("a", 5)
    holder.free("a")
    assert holder.num_free_blocks == 3 and holder.held_bytes == 0


def test_room_reserved_ahead_is_what_decode_steps_grow_into(make_engine):
    spec = make_engine().kv_spec
    kv = RangeKV(spec, 3)  # 48 tokens
    kv.open("s", 0)
    kv.grow("s", 32)
    kv.reserve_room("s", 16)  # the last block, taken now
    assert kv.num_free_blocks == 0
    for _ in range(16):  # every step fits in the room: no free block is needed
        kv.extend(["s"])
        for layer in range(spec.num_layers):
            zeros = torch.zeros(1, spec.num_kv_heads, spec.head_dim)
            kv.append(layer, ["s"], zeros, zeros)
    assert kv.ranges["s"].num_tokens == 48
    with pytest.raises(OutOfBlocksError):
        kv.extend(["s"])


def test_kv_ranges_must_tile_the_prompt_on_block_boundaries():
    from tandem.transfer.base import KVTarget, ReceiverInfo
    from tandem.transfer.ranges import RangeTarget, check_ranges

    def r(first: int, n: int) -> RangeTarget:
        return RangeTarget(KVTarget(ReceiverInfo("grpc", "x"), (), n), first)

    check_ranges([r(0, 32), r(32, 5)], 37, 16)
    with pytest.raises(ValueError, match="starts at token 30, expected 32"):
        check_ranges([r(0, 32), r(30, 7)], 37, 16)
    with pytest.raises(ValueError, match=r"block boundaries \(16 tokens\); one starts at token 8"):
        check_ranges([r(0, 8), r(8, 29)], 37, 16)
    with pytest.raises(ValueError, match="cover 32 tokens; the prompt has 37"):
        check_ranges([r(0, 32)], 37, 16)


def test_blocks_come_in_runs_and_a_fragmented_sequence_still_attends_exactly(make_engine):
    """A sequence's blocks continue its last one when free, so its KV is one run read in
    place; when another sequence took the next block, its KV spans runs, merged by LSE, and
    attention equals the reference over all of it."""
    from tandem.attention_worker.block_pool import runs_of

    spec = make_engine().kv_spec
    kv = RangeKV(spec, 8)
    kv.open("a", 0)
    kv.open("b", 0)
    kv.grow("a", 16)  # block 0
    kv.grow("b", 16)  # block 1: a's next block is taken
    kv.grow("a", 40)  # blocks 2, 3, 4 in a run
    assert kv.ranges["a"].blocks == [0, 2, 3, 4]
    assert runs_of([0, 2, 3, 4], 56, 16) == [(0, 16), (2, 40)]
    gen = torch.Generator().manual_seed(3)
    kv.cache.data.copy_(torch.randn(kv.cache.data.shape, generator=gen))
    q = torch.randn(2, 9, spec.head_dim, generator=gen)
    out, lse = kv.attend(4, ["a", "b"], q, 0.125)
    k_pool, v_pool = kv.cache.layer(4)
    for row, (seq, blocks, n) in enumerate([("a", [0, 2, 3, 4], 56), ("b", [1], 16)]):
        keys = k_pool[blocks].flatten(0, 1)[:n].transpose(0, 1)[None]
        values = v_pool[blocks].flatten(0, 1)[:n].transpose(0, 1)[None]
        want_out, want_lse = attend_with_lse(q[row:row + 1], keys, values, torch.tensor([n]),
                                             0.125)
        assert torch.allclose(out[row], want_out[0], atol=1e-5), seq
        assert torch.allclose(lse[row], want_lse[0], atol=1e-5), seq


def test_a_ranged_session_cuts_each_piece_at_the_range_boundaries():
    """Each posted piece (layers x a run of the request's blocks) reaches each range's
    session as its part, numbered from that range's first block."""
    import asyncio

    from tandem.transfer.base import Handoff
    from tandem.transfer.ranges import RangedSession

    class Recorder:
        def __init__(self):
            self.posts, self.finished, self.aborted = [], None, False

        def post(self, layers, first_block, src_blocks):
            self.posts.append((layers, first_block, list(src_blocks)))

        async def finish(self, handoff, timeout):
            self.finished = handoff

        async def abort(self):
            self.aborted = True

    a, b, c = Recorder(), Recorder(), Recorder()
    session = RangedSession([(0, 3, a), (3, 3, b), (6, 1, c)])  # blocks 0-2, 3-5, 6
    session.post(range(0, 2), 0, [10, 11, 12, 13, 14, 15, 16])  # every block, layers 0-1
    session.post(range(2, 3), 2, [12, 13])  # a piece across the first boundary
    assert a.posts == [(range(0, 2), 0, [10, 11, 12]), (range(2, 3), 2, [12])]
    assert b.posts == [(range(0, 2), 0, [13, 14, 15]), (range(2, 3), 0, [13])]
    assert c.posts == [(range(0, 2), 0, [16])]
    asyncio.run(session.finish(Handoff("r", [7]), 1.0))
    assert a.finished == b.finished == c.finished == Handoff("r", [7])
    asyncio.run(session.abort())
    assert a.aborted and b.aborted and c.aborted
