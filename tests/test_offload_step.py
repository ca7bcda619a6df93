"""Decode with attention offloaded to KV holders (attention workers' `RangeKV`), in one process:
the dense layers run here, each sequence's KV is split by token range over holders, and the
greedy tokens are identical to local decoding (fp32), including a batch that mixes split and
unsplit sequences and a sequence that spills to another holder mid-generation. Nothing is held
locally: the engine that prefilled has freed every block."""

from __future__ import annotations

import pytest
import torch

from tandem.attention_worker.range_kv import RangeKV
from tandem.engine.errors import KVHolderLost
from tandem.engine.offload import OffloadedSequence, offloaded_decode_step

from .conftest import greedy, run_to_completion

PROMPTS = [list(range(500, 550)), list(range(900, 930))]  # 50 and 30 tokens


def prefill(engine, prompt: list[int]) -> tuple[int, torch.Tensor]:
    """The first token and the KV [layers, 2, tokens, kv_heads, head_dim] of a real prefill."""
    engine.add_request("p", prompt, greedy(1), prefill_only=True)
    while not (outputs := engine.step()):
        pass
    kv = engine.export_kv("p")
    engine.release("p")
    return outputs[0].token_ids[0], kv.data.flatten(2, 3)[:, :, :kv.num_tokens]


def place(seq_id: str, kv: torch.Tensor, holders: list[RangeKV],
          ranges: list[tuple[int, int]]) -> None:
    for holder, (lo, hi) in zip(holders, ranges, strict=True):
        holder.open(seq_id, lo)
        slots = holder.grow(seq_id, hi - lo)
        for layer in range(kv.shape[0]):
            holder.write(layer, slots, kv[layer, 0, lo:hi], kv[layer, 1, lo:hi])


def decode(model, seqs: list[OffloadedSequence], first: list[int], lengths: list[int],
           steps: int, micro_batches: int = 1) -> list[list[int]]:
    tokens = [[t] for t in first]
    for step in range(steps):
        result = offloaded_decode_step(model, seqs, [t[-1] for t in tokens],
                                       [n + step for n in lengths], micro_batches)
        assert not result.lost
        for row, token in enumerate(result.logits.argmax(dim=-1).tolist()):
            tokens[row].append(token)
    return tokens


@pytest.mark.parametrize("micro_batches", [1, 2], ids=["one batch", "ping-pong"])
@pytest.mark.parametrize("case", ["one holder", "split over three", "spills"])
def test_offloaded_greedy_decode_is_identical_to_local(make_engine, case, micro_batches):
    n = 18
    want = run_to_completion(make_engine(), PROMPTS, greedy(n))
    engine = make_engine()
    spec = engine.kv_spec
    firsts, kvs = zip(*(prefill(engine, p) for p in PROMPTS), strict=True)
    spare = RangeKV(spec, 8)
    if case == "one holder":
        holders = [RangeKV(spec, 16)]
        plans = [[(0, 50)], [(0, 30)]]
    elif case == "split over three":  # one of them holding a single token
        holders = [RangeKV(spec, 8) for _ in range(3)]
        plans = [[(0, 20), (20, 21), (21, 50)], [(0, 30)]]
    else:  # the tail has room for 14 more tokens of the first sequence, then it spills
        holders = [RangeKV(spec, 4), RangeKV(spec, 4)]
        plans = [[(0, 50)], [(0, 30)]]
    seqs = []
    for i, (kv, plan) in enumerate(zip(kvs, plans, strict=True)):
        used = holders[:len(plan)] if i == 0 else holders[-1:]
        place(f"s{i}", kv, used, plan)
        seqs.append(OffloadedSequence(f"s{i}", list(used), spill_to=[spare]))
    got = decode(engine.loaded.model, seqs, list(firsts), [len(p) for p in PROMPTS], n - 1,
                 micro_batches)
    assert got == want
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # nothing held locally
    if case == "spills":
        assert seqs[0].holders[-1] is spare and spare.ranges["s0"].first_token == 64
    held = sum(r.num_tokens for h in [*holders, spare] for r in h.ranges.values())
    assert held == sum(len(p) + n - 1 for p in PROMPTS)  # every token's KV, exactly once


def test_a_sequence_with_nowhere_to_spill_is_reported_lost_alone(make_engine):
    engine = make_engine()
    firsts, kvs = zip(*(prefill(engine, p) for p in PROMPTS), strict=True)
    full = RangeKV(engine.kv_spec, 2)  # 32 tokens of room: full after 2 steps
    roomy = RangeKV(engine.kv_spec, 8)
    place("s0", kvs[1], [full], [(0, 30)])
    place("s1", kvs[0], [roomy], [(0, 50)])
    seqs = [OffloadedSequence("s0", [full]), OffloadedSequence("s1", [roomy])]
    model = engine.loaded.model
    decode(model, seqs, list(firsts[::-1]), [30, 50], 2)
    step = offloaded_decode_step(model, seqs, [1, 1], [32, 52])
    assert list(step.lost) == [0] and "no attention worker has room" in step.lost[0]


class FailingHolder:
    """A holder that answers like `inner` until `fail_at_layer`, then is gone."""

    def __init__(self, inner: RangeKV, fail_at_layer: int) -> None:
        self.inner, self.fail_at_layer = inner, fail_at_layer

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def request_attend(self, layer, seq_ids, q, scale):
        if layer >= self.fail_at_layer:
            raise KVHolderLost("aw-test", "connection reset")
        return self.inner.request_attend(layer, seq_ids, q, scale)


@pytest.mark.parametrize("micro_batches", [1, 2], ids=["one batch", "ping-pong"])
def test_a_lost_holder_costs_only_its_own_sequences(make_engine, micro_batches):
    n = 6
    want = run_to_completion(make_engine(), PROMPTS, greedy(n))
    engine = make_engine()
    firsts, kvs = zip(*(prefill(engine, p) for p in PROMPTS), strict=True)
    healthy, doomed = RangeKV(engine.kv_spec, 8), RangeKV(engine.kv_spec, 8)
    place("s0", kvs[0], [healthy], [(0, 50)])
    place("s1", kvs[1], [doomed], [(0, 30)])
    failing = FailingHolder(doomed, fail_at_layer=5)
    seqs = [OffloadedSequence("s0", [healthy]), OffloadedSequence("s1", [failing])]
    step = offloaded_decode_step(engine.loaded.model, seqs, list(firsts), [50, 30],
                                 micro_batches)
    assert list(step.lost) == [1] and "connection reset" in step.lost[1]
    assert step.logits[0].argmax().item() == want[0][1]  # the other sequence goes on exactly


def test_an_engine_batch_mixes_local_and_offloaded_sequences(make_engine):
    n = 10
    prompts = [*PROMPTS, list(range(1200, 1240))]
    want = run_to_completion(make_engine(), prompts, greedy(n))
    engine = make_engine()
    firsts, kvs = zip(*(prefill(engine, p) for p in PROMPTS), strict=True)
    holders = [RangeKV(engine.kv_spec, 8), RangeKV(engine.kv_spec, 8)]
    place("a", kvs[0], holders, [(0, 32), (32, 50)])
    place("b", kvs[1], holders[1:], [(0, 30)])
    engine.adopt_offloaded("a", PROMPTS[0], [firsts[0]], greedy(n),
                           OffloadedSequence("a", list(holders)))
    engine.adopt_offloaded("b", PROMPTS[1], [firsts[1]], greedy(n),
                           OffloadedSequence("b", holders[1:]))
    engine.add_request("c", prompts[2], greedy(n))  # local: prefills, then decodes alongside
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
            elif out.request_id in "ab":
                assert engine.seqs[out.request_id].block_table == []  # no block held here
    assert [done["a"], done["b"], done["c"]] == want
    assert all(not h.ranges for h in holders)  # finished: freed on the attention workers
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
