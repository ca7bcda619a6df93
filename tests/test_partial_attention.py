"""The exact merge of partial attentions (DistAttention), on random inputs in fp32: any split of
a sequence's KV by token range, GQA, single-token and empty shards (lse -inf) give attention
over the whole KV within 1e-5, with no NaN."""

from __future__ import annotations

import itertools
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.engine.partial_attention import attend_with_lse, merge_partials


def full_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """The reference: softmax over every key, query heads repeated onto their KV heads."""
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1)  # [B, Hq, L, D]
    v = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhld->bhl", q, k) * scale
    return torch.einsum("bhl,bhld->bhd", torch.softmax(scores, dim=-1), v)


@st.composite
def split_problems(draw):
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([4, 8, 64]))
    length = draw(st.integers(1, 40))
    # Cut points (repeats make empty shards; neighbours make single-token shards).
    cuts = sorted(draw(st.lists(st.integers(0, length), max_size=5)))
    bounds = [0, *cuts, length]
    seed = draw(st.integers(0, 2**31 - 1))
    return kv_heads, group, head_dim, length, list(itertools.pairwise(bounds)), seed


@settings(max_examples=200, deadline=None)
@given(split_problems())
def test_merged_shards_equal_attention_over_the_whole_kv(problem):
    kv_heads, group, head_dim, length, shards, seed = problem
    gen = torch.Generator().manual_seed(seed)
    batch, heads = 2, kv_heads * group
    q = torch.randn(batch, heads, head_dim, generator=gen)
    keys = torch.randn(batch, kv_heads, length, head_dim, generator=gen) * 3
    values = torch.randn(batch, kv_heads, length, head_dim, generator=gen)
    scale = 1 / math.sqrt(head_dim)
    outs, lses = [], []
    for lo, hi in shards:
        width = max(hi - lo, 1)  # an empty shard still has a (padded) KV tensor
        part_k = torch.zeros(batch, kv_heads, width, head_dim)
        part_v = torch.zeros(batch, kv_heads, width, head_dim)
        part_k[:, :, :hi - lo] = keys[:, :, lo:hi]
        part_v[:, :, :hi - lo] = values[:, :, lo:hi]
        out, lse = attend_with_lse(q, part_k, part_v, torch.full((batch,), hi - lo), scale)
        if hi == lo:
            assert torch.all(lse == float("-inf")) and torch.all(out == 0)
        outs.append(out)
        lses.append(lse)
    out, lse = merge_partials(torch.stack(outs), torch.stack(lses))
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, full_attention(q, keys, values, scale), atol=1e-5, rtol=1e-5)
    whole = torch.logsumexp(torch.einsum("bhd,bhld->bhl", q, keys.repeat_interleave(
        group, dim=1)) * scale, dim=-1)
    torch.testing.assert_close(lse, whole, atol=1e-5, rtol=1e-5)


def test_sequences_of_different_lengths_in_one_part_ignore_the_padding():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, generator=gen)
    keys, values = torch.randn(2, 2, 10, 8, generator=gen), torch.randn(2, 2, 10, 8, generator=gen)
    out, _ = attend_with_lse(q, keys, values, torch.tensor([10, 3]), 0.35)
    torch.testing.assert_close(out[0], full_attention(q[:1], keys[:1], values[:1], 0.35)[0])
    torch.testing.assert_close(out[1], full_attention(q[1:], keys[1:, :, :3], values[1:, :, :3],
                                                      0.35)[0])


def test_every_part_empty_merges_to_zero_and_minus_infinity_not_nan():
    outs = torch.zeros(3, 2, 4, 8)
    lses = torch.full((3, 2, 4), float("-inf"))
    out, lse = merge_partials(outs, lses)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_bf16_kv_is_scored_in_fp32():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 3, 64, generator=gen).bfloat16()
    keys = torch.randn(1, 3, 16, 64, generator=gen).bfloat16()
    values = torch.randn(1, 3, 16, 64, generator=gen).bfloat16()
    out, lse = attend_with_lse(q, keys, values, torch.tensor([16]), 0.125)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out, full_attention(q.float(), keys.float(), values.float(),
                                                   0.125), atol=1e-5, rtol=1e-5)
