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


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.sampled_from([(3, 1), (6, 3), (9, 3)]), st.integers(1, 4),
       st.data())
def test_paged_attention_with_lse_matches_the_reference_including_empty_rows(
        batch, heads, width, data):
    """The kernel an attention worker runs (CPU: torch's flash kernel with its LSE) gives the
    same out and lse as the plain fp32 reference over the gathered KV, padding and empty rows
    included."""
    from tandem.engine.partial_attention import paged_attend_with_lse

    num_heads, num_kv_heads = heads
    block_size, head_dim, num_blocks = 4, 16, 12
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    k_pool = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_pool = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    tables = torch.randint(0, num_blocks, (batch, width), generator=gen)
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, width * block_size),
                                              min_size=batch, max_size=batch)))
    q = torch.randn(batch, num_heads, head_dim, generator=gen)
    out, lse = paged_attend_with_lse(q, k_pool, v_pool, tables, lengths, 0.25)
    keys = k_pool[tables].flatten(1, 2).transpose(1, 2)
    values = v_pool[tables].flatten(1, 2).transpose(1, 2)
    want_out, want_lse = attend_with_lse(q, keys, values, lengths, 0.25)
    assert not out.isnan().any()
    assert torch.allclose(out, want_out, atol=1e-5)
    assert torch.equal(lse.isinf(), want_lse.isinf())
    finite = want_lse.isfinite()
    assert torch.allclose(lse[finite], want_lse[finite], atol=1e-5)
