"""Cache-Craft's chunk-cache variants: a chunk's KV as computed exactly in a real context.

A chunk's KV computed on its own misses what the chunks before it say; computed behind other
chunks (during a full prefill, never from blended KV) it carries that context. Such KV is kept
as a *variant* of the chunk, keyed by the chunk and the hashes of the (up to) two chunks that
preceded it, nearest last. A chunk lists at most `MAX_VARIANTS` of them (the isolated KV,
context (), is one). The planner takes the variant whose context matches the prompt's most
(the nearer chunk first), else the isolated one.

Each variant carries its *dependence*: the share of its tokens' attention that went to
earlier tokens (past the sequence's first, the attention sink) at layer 1 of the prefill that
made it. A chunk that attends only to itself (near 0) reads the same anywhere; a dependent
one needs more of its tokens recomputed where its context differs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from tandem.engine.blend import shift_keys
from tandem.engine.blend_layer import attend
from tandem.engine.blend_select import DEPENDENCE_QUERIES, SINK_POSITIONS, attention_probs
from tandem.engine.kv_cache import KVSpec
from tandem.engine.model import LlamaModel
from tandem.engine.rotary import Positions

CONTEXT_CHUNKS = 2  # preceding chunks in a variant's key
MAX_VARIANTS = 4  # per chunk, the isolated one included

Context = tuple[str, ...]  # hashes of the preceding chunks, nearest last; () = isolated


@dataclass(frozen=True)
class Variant:
    context: Context
    dependence: float | None  # None: not measured (isolated KV has no context to depend on)


@dataclass(frozen=True)
class CapturedVariant:
    token_ids: list[int]
    context: Context
    kv: torch.Tensor  # [layers, 2, tokens, kv_heads, head_dim], keys as if at position 0
    dependence: float


def chunk_hash(token_ids: list[int]) -> str:
    data = torch.tensor(token_ids, dtype=torch.int32).numpy().tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def context_of(chunks: list[list[int]], j: int) -> Context:
    """The context chunk `j` of a prompt sits in: its preceding chunks' hashes."""
    return tuple(chunk_hash(c) for c in chunks[max(0, j - CONTEXT_CHUNKS):j])


def overlap(variant: Context, wanted: Context) -> int:
    """How many of the nearest preceding chunks the two contexts share, in order."""
    n = 0
    for a, b in zip(reversed(variant), reversed(wanted), strict=False):
        if a != b:
            break
        n += 1
    return n


def choose(variants: list[Variant], wanted: Context) -> Variant | None:
    """The variant whose context matches `wanted` most (ties: the least dependent); with no
    overlap, the isolated one (None when there is none: the chunk is computed)."""
    best = max(variants, key=lambda v: (overlap(v.context, wanted), -(v.dependence or 0.0)),
               default=None)
    if best is not None and best.context and overlap(best.context, wanted) > 0:
        return best
    return next((v for v in variants if not v.context), None)


@torch.inference_mode()
def capture(model: LlamaModel, spec: KVSpec, token_ids: list[int], kv: torch.Tensor,
            prefix_len: int, chunks: list[list[int]]) -> list[CapturedVariant]:
    """The variants a full prefill leaves behind: each chunk after the first of `chunks`
    (laid out after `prefix_len` tokens of `token_ids`) with its exact KV from `kv`
    [layers, 2, tokens, heads, dim], moved to position 0, and its measured dependence."""
    out, start = [], prefix_len
    for j, chunk in enumerate(chunks):
        end = start + len(chunk)
        context = context_of(chunks, j)
        if context:  # the first chunk's context is the prefix alone: its isolated KV serves
            part = kv[:, :, start:end].clone()
            for layer in range(spec.num_layers):
                part[layer, 0] = shift_keys(model, part[layer, 0], -start)
            dep = measure_dependence(model, token_ids, kv, start, end)
            out.append(CapturedVariant(chunk, context, part, dep))
        start = end
    return out


def measure_dependence(model: LlamaModel, token_ids: list[int], kv: torch.Tensor, start: int,
                       end: int) -> float:
    """The attention mass tokens [start, end) put on earlier tokens past the sink at layer 1,
    from a sequence's exact KV [layers, 2, tokens, heads, dim]: sampled tokens are run through
    layer 0 against the exact KV, so their layer-1 queries are full prefill's."""
    device = next(model.parameters()).device
    rows = torch.linspace(start, end - 1, min(DEPENDENCE_QUERIES, end - start)).long()
    rows = rows.unique().to(device)
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)[rows]
    first, second = model.layers[0], model.layers[1]
    kv = kv.to(device)
    q, _, _, residual = first.pre_attn(model.embed_tokens(ids), Positions(rows, model.rotary))
    out = attend(q, kv[0, 0, :end], kv[0, 1, :end], rows, first.self_attn.scale)
    x = first.post_attn(out, residual)
    q = second.pre_attn(x, Positions(rows, model.rotary))[0]
    probs = attention_probs(q, kv[1, 0, :end], rows, second.self_attn.scale)
    return float(probs[:, SINK_POSITIONS:start].sum(1).mean())
