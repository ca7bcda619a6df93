"""CacheBlend: reuse the KV of text chunks that are not a prefix, recomputing a few tokens.

A chunk's KV is computed on its own from position 0, so wherever the chunk lands it misses the
attention to what comes before it, and its keys carry RoPE for the wrong positions. Blending
`prefix + chunk 1 + ... + chunk N` (the question is computed afterwards, as ordinary prefill on
top of the blended KV), one layer at a time:
1. Move each chunk's keys to their real positions: R(p + d) = R(d) R(p), values unchanged.
2. Layer 0 runs for every token (its K/V depend only on token and position, so the loaded ones
   are already right, but its output feeds layer 1).
3. From layer 1 on, the selected tokens' K/V are computed and compared with the reused ones; the
   tokens that moved most (the HKVD tokens; |new - old|^2 / |new|^2 for K plus the same for V)
   stay selected: `GRADUAL_START` x `recompute_ratio`
   of the chunk tokens at layer 1, shrinking to `recompute_ratio` at the middle layer (the
   paper's gradual filtering). Only they go on through attention and the MLP, their queries
   attending to every key before them; everyone's fresh K/V are written over the reused ones.
Measured on SmolLM2-135M over 5 built prompts at ratio 0.15, next-token KL from full prefill:
full reuse 0.323; gradual filtering by absolute K+V deviation 0.095, by relative deviation 0.060
(one selection at layer 1, absolute, was 0.260 against 0.354 for full reuse on 4 of them).
Uncached prefix tokens are computed in every layer. `recompute_ratio=1` is full
prefill; `0` uses the chunks' KV as loaded. While layer i computes, layer i + 1's chunk KV is
fetched.
`BlendOptions` (blend_select) change what is recomputed: per-chunk budgets (fixed, or from each
chunk's dependence measured at layer 1: Cache-Craft), each chunk's first tokens, question-aware
selection (the question's tokens but its last are blended too, as the tail). The tokens kept
through a layer are run by `blend_layer.LayerStep`.
Dense, one sequence at a time: blending is a prefill-side step before the engine takes over.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from tandem.engine.blend_layer import LayerStep
from tandem.engine.blend_select import BlendOptions
from tandem.engine.errors import EngineError
from tandem.engine.kv_cache import KVBlocks, KVSpec
from tandem.engine.model import LlamaModel
from tandem.engine.rotary import rotate

ChunkLayer = Callable[[int], torch.Tensor]
"""layer -> the chunks' KV of that layer [2, chunk tokens, kv_heads, head_dim], each chunk's
keys as computed from position 0."""

FETCH_TIMEOUT_S = 30.0  # one layer's chunk KV; the source bounds each of its own reads
DEFAULT_OPTIONS = BlendOptions()


class ChunkKVUnavailable(EngineError):
    """A chunk's cached KV could not be read while blending."""


class BlendCancelled(EngineError):
    """The request was aborted while its chunks were planned or blended."""


@dataclass
class BlendResult:
    kv: KVBlocks  # the prefix and the chunks, blended
    exact_tokens: int  # leading tokens whose KV is exact (the prefix): cacheable as a prefix
    cached_tokens: int  # tokens whose KV was loaded from a cache rather than computed
    recomputed_tokens: int  # chunk tokens recomputed through the deepest layers
    # Per chunk, the attention mass its tokens put on earlier ones (with
    # BlendOptions.measure_dependence and chunks computed at layer 1), else None.
    dependence: list[float] | None = None
    # Per chunk, how many of its nearest preceding chunks its cached KV was computed behind
    # (a matched variant; 0: its own KV), as the planner chose.
    matched: tuple[int, ...] | None = None


def shift_keys(model: LlamaModel, keys: torch.Tensor, delta: int | torch.Tensor) -> torch.Tensor:
    """Keys [n, kv_heads, head_dim] computed at positions p, moved to p + `delta` (one offset,
    or one per key; negative moves back), rotated in float32."""
    if isinstance(delta, int):
        if delta == 0:
            return keys
        delta = torch.full((keys.shape[0],), delta, dtype=torch.long)
    delta = delta.to(keys.device)
    cos, sin = model.rotary.lookup(delta.abs(), torch.float32)  # R(-d) = R(d) transposed
    sin = torch.where(delta.view(-1, 1, 1) < 0, -sin, sin)
    return rotate(keys.float(), (cos, sin)).to(keys.dtype)


@torch.inference_mode()
def blend(model: LlamaModel, spec: KVSpec, prefix_kv: KVBlocks | None, fresh_ids: list[int],
          chunks: list[list[int]], chunk_layer: ChunkLayer, recompute_ratio: float, *,
          tail_ids: list[int] = (), options: BlendOptions = DEFAULT_OPTIONS,
          cached_tokens: int = 0, fetch_timeout_s: float = FETCH_TIMEOUT_S,
          cancelled: Callable[[], bool] | None = None) -> BlendResult:
    """Blend `chunks` (their KV from `chunk_layer`) after the prefix: `prefix_kv` (exact KV of
    its first tokens, or None) then `fresh_ids` (its tokens without KV, computed in full);
    `tail_ids` (the question but its last token) follow the chunks, computed in full."""
    if not 0.0 <= recompute_ratio <= 1.0 or math.isnan(recompute_ratio):
        raise ValueError(f"recompute_ratio: {recompute_ratio} is not in [0, 1]")
    if options.matched is not None and len(options.matched) != len(chunks):
        raise ValueError(f"matched: {len(options.matched)} entries for {len(chunks)} chunks")
    budgets = options.budgets
    if budgets is not None and (len(budgets) != len(chunks) or any(
            not 0 <= b <= len(ch) for b, ch in zip(budgets, chunks, strict=True))):
        raise ValueError(f"budgets: {list(budgets)} do not fit chunks of "
                         f"{[len(ch) for ch in chunks]} tokens")
    device = next(model.parameters()).device
    c = prefix_kv.num_tokens if prefix_kv is not None else 0
    f, n, t = len(fresh_ids), sum(map(len, chunks)), len(tail_ids)
    total = c + f + n + t
    out = torch.zeros((spec.num_layers, 2, spec.num_blocks_for(total) * spec.block_size,
                       spec.num_kv_heads, spec.head_dim), dtype=spec.torch_dtype, device=device)
    if prefix_kv is not None:
        flat = prefix_kv.data.reshape(spec.num_layers, 2, -1, spec.num_kv_heads, spec.head_dim)
        out[:, :, :c] = flat[:, :, :c].to(device)
    lengths = torch.tensor([len(chunk) for chunk in chunks], dtype=torch.long)
    starts = (c + f + lengths.cumsum(0) - lengths).repeat_interleave(lengths)  # per chunk token
    rope_dtype = torch.float32 if options.rope_fp32 else spec.torch_dtype
    shift = model.rotary.lookup(starts.to(device), rope_dtype)  # R(start), for every layer
    # Without budgets, CacheBlend's selection: the chunk tokens compete as one group.
    if recompute_ratio >= 1.0:  # everything recomputed: full prefill, whatever the policy
        options = replace(options, budgets=None, dependence_budgets=False)
        budgets = None
    per_chunk = budgets is not None or options.dependence_budgets
    groups = [len(ch) for ch in chunks] if per_chunk else [n]
    if budgets is None:
        budgets = tuple(round(recompute_ratio * g) for g in groups)
    computing = any(budgets) or options.sink_tokens > 0
    chunk_of = _chunk_of(chunks, options.sink_tokens, f, t, computing, per_chunk, device)
    chunk_ids = [tok for chunk in chunks for tok in chunk] if computing else []
    ids = torch.tensor([*fresh_ids, *chunk_ids, *tail_ids], dtype=torch.long, device=device)
    active = torch.cat((torch.arange(c, c + f + (n if computing else 0)),
                        torch.arange(c + f + n, total))).to(device)
    x = model.embed_tokens(ids) if len(active) else None
    spans = [(int(s), int(s) + len(chunk)) for s, chunk in
             zip((c + f + lengths.cumsum(0) - lengths).tolist(), chunks, strict=True)]
    step = LayerStep(model, chunk_of, budgets, groups, spans, options,
                      c + f + n if options.question_aware and t else None,
                      round(recompute_ratio * n))
    with LayerPrefetch(chunk_layer, spec.num_layers if n else 0, fetch_timeout_s) as fetch:
        for index, layer in enumerate(model.layers):
            if cancelled is not None and cancelled():
                raise BlendCancelled(f"aborted at layer {index} of the blend")
            keys, values = out[index, 0, :total], out[index, 1, :total]
            if n:
                loaded = fetch.get(index).to(device)
                keys[c + f:c + f + n] = rotate(loaded[0].to(rope_dtype), shift).to(keys.dtype)
                values[c + f:c + f + n] = loaded[1]
            if x is not None:
                active, x = step(index, layer, x, active, keys, values)
    recomputed = int((step.chunk_of != -1).sum()) if x is not None else 0
    kv = KVBlocks(spec, total, out.view(spec.num_layers, 2, -1, spec.block_size,
                                        spec.num_kv_heads, spec.head_dim).cpu())
    exact = c + f if prefix_kv is None or prefix_kv.exact else 0  # a lossy prefix: none
    return BlendResult(kv, exact, cached_tokens, recomputed, step.dependence)


def _chunk_of(chunks: list[list[int]], sinks: int, f: int, t: int, computing: bool,
              per_chunk: bool, device: torch.device) -> torch.Tensor:
    """Per token the blend computes at layer 0: its selection group (its chunk, or 0 for all
    of them), -1 (always computed: the fresh prefix, the tail) or -2 (a chunk's first `sinks`
    tokens: always recomputed)."""
    parts = [torch.full((f,), -1, dtype=torch.long)]
    if computing:
        for j, chunk in enumerate(chunks):
            part = torch.full((len(chunk),), j if per_chunk else 0, dtype=torch.long)
            part[:sinks] = -2
            parts.append(part)
    parts.append(torch.full((t,), -1, dtype=torch.long))
    return torch.cat(parts).to(device)


@torch.inference_mode()
def compute_kv(model: LlamaModel, spec: KVSpec, token_ids: list[int]) -> torch.Tensor:
    """The KV of `token_ids` computed on their own from position 0: [layers, 2, n, heads, dim]."""
    result = blend(model, spec, None, token_ids, [], no_chunks, 1.0)
    data = result.kv.data.reshape(spec.num_layers, 2, -1, spec.num_kv_heads, spec.head_dim)
    return data[:, :, :len(token_ids)]


def no_chunks(layer: int) -> torch.Tensor:
    raise AssertionError("no chunks to fetch")


class LayerPrefetch:
    """Fetches each layer's chunk KV one layer ahead, on a thread of its own."""

    def __init__(self, fetch: ChunkLayer, num_layers: int, timeout_s: float) -> None:
        self.fetch, self.num_layers, self.timeout_s = fetch, num_layers, timeout_s
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="blend-fetch")
        self._next: Future | None = self._submit(0)

    def _submit(self, layer: int) -> Future | None:
        return self._pool.submit(self.fetch, layer) if layer < self.num_layers else None

    def get(self, layer: int) -> torch.Tensor:
        future, self._next = self._next, self._submit(layer + 1)
        assert future is not None, "layers are fetched in order"
        try:
            return future.result(self.timeout_s)
        except TimeoutError:
            raise ChunkKVUnavailable(f"layer {layer} of the chunk KV took over "
                                     f"{self.timeout_s} s to read") from None

    def __enter__(self) -> LayerPrefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._next is not None:
            self._next.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
