"""Decode with attention offloaded to KV holders (attention workers' `RangeKV`), in one process:
the dense layers run here, each sequence's KV is split by token range over holders, and the
greedy tokens are identical to local decoding (fp32), including a batch that mixes split and
unsplit sequences and a sequence that spills to another holder mid-generation. Nothing is held
locally: the engine that prefilled has freed every block."""

from __future__ import annotations

import pytest
import torch

from tandem.attention_worker.range_kv import RangeKV
from tandem.engine.errors import OutOfBlocksError
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
           steps: int) -> list[list[int]]:
    tokens = [[t] for t in first]
    for step in range(steps):
        logits = offloaded_decode_step(model, seqs, [t[-1] for t in tokens],
                                       [n + step for n in lengths])
        for row, token in enumerate(logits.argmax(dim=-1).tolist()):
            tokens[row].append(token)
    return tokens


@pytest.mark.parametrize("case", ["one holder", "split over three", "spills"])
def test_offloaded_greedy_decode_is_identical_to_local(make_engine, case):
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
    got = decode(engine.loaded.model, seqs, list(firsts), [len(p) for p in PROMPTS], n - 1)
    assert got == want
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # nothing held locally
    if case == "spills":
        assert seqs[0].holders[-1] is spare and spare.ranges["s0"].first_token == 64
    held = sum(r.num_tokens for h in [*holders, spare] for r in h.ranges.values())
    assert held == sum(len(p) + n - 1 for p in PROMPTS)  # every token's KV, exactly once


def test_a_sequence_with_nowhere_to_spill_is_refused(make_engine):
    engine = make_engine()
    first, kv = prefill(engine, PROMPTS[1])
    full = RangeKV(engine.kv_spec, 2)  # 32 tokens of room: full after 2 steps
    place("s", kv, [full], [(0, 30)])
    seq = OffloadedSequence("s", [full])
    decode(engine.loaded.model, [seq], [first], [30], 2)
    with pytest.raises(OutOfBlocksError, match="no attention worker has room"):
        decode(engine.loaded.model, [seq], [first], [32], 1)
