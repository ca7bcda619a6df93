"""CUDA-graph decode: captured once per batch-size bucket at start, replayed every decode step.

A decode step's kernels (about 10 a layer) take far less GPU time than Python takes to launch
them, so decode-only steps replay a graph captured for the smallest bucket that holds the batch:
1, 2, 4, 8, then every 8 up to `max_num_seqs` (at most 512). The graph reads its inputs from one
static buffer (token ids, positions, slots, rows: `DecodeStep.packed`) and the device-resident
block tables, computes the context lengths itself, and leaves the logits in its own output;
the step copies its inputs into the buffer and replays. All graphs share one memory pool and are
captured largest first, so they share one set of activations, and they write their logits into
one shared output (a graph's own output would stay allocated: with a 128k vocabulary, every
bucket up to 512 holding its own would take 8 GiB). Prefill and mixed steps, and batches beyond
the largest bucket, run eagerly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from tandem.engine.attention import DecodeBatch, ForwardContext
from tandem.engine.batch_inputs import gather_slots
from tandem.engine.decode_inputs import NUM_FIELDS, DecodeInputs, DecodeStep
from tandem.engine.kv_cache import KVCache
from tandem.engine.model import LlamaModel

logger = logging.getLogger(__name__)

MAX_CAPTURED_BATCH = 512


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The buckets: 1, 2, 4, 8, then every 8, up to the first that holds `max_num_seqs`
    (at most 512)."""
    candidates = [1, 2, 4, *range(8, MAX_CAPTURED_BATCH + 1, 8)]
    top = bucket_for(candidates, max_num_seqs) or MAX_CAPTURED_BATCH
    return [s for s in candidates if s <= top]


def bucket_for(sizes: list[int], n: int) -> int | None:
    """The smallest bucket that holds `n` sequences; None when `n` exceeds them all."""
    return next((s for s in sizes if s >= n), None)


def decode_forward(model: LlamaModel, cache: KVCache, inputs: DecodeInputs,
                   packed: torch.Tensor, max_context_len: int | None = None) -> torch.Tensor:
    """One decode token for each column of `packed` -> float32 logits [columns, vocab]. With
    `max_context_len` None (the Triton path) it reads no device value on the host, so it can
    be captured; the CPU path gathers each context, `max_context_len` wide."""
    input_ids, positions, slots, rows = packed
    size = packed.shape[1]
    context_lens = (positions + 1).to(torch.int32)
    batch = DecodeBatch(size=size, block_tables=inputs.block_tables, context_lens=context_lens,
                        seq_rows=rows)
    if max_context_len is not None:
        tables = inputs.block_tables.index_select(0, rows)
        batch.slots, batch.mask = gather_slots(tables, context_lens, max_context_len,
                                               inputs.block_size)
    ctx = ForwardContext(cache=cache, slot_mapping=slots, decode=batch,
                         use_triton=max_context_len is None)
    return model.logits(model(input_ids, positions, ctx))


class DecodeGraphs:
    def __init__(self, model: LlamaModel, cache: KVCache, inputs: DecodeInputs,
                 sizes: list[int]) -> None:
        self.model, self.cache, self.inputs, self.sizes = model, cache, inputs, sizes
        device = cache.data.device
        # Idle columns decode from the padding row into the scratch block, never a real block.
        filler = torch.tensor([0, 0, inputs.scratch_slot, inputs.padding_row], device=device)
        self.static = filler.unsqueeze(1).repeat(1, sizes[-1]).contiguous()
        self.logits: torch.Tensor | None = None  # [largest bucket, vocab] float32, shared
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.num_replays = 0

    @torch.inference_mode()
    def capture(self, sizes: list[int] | None = None,
                progress: Callable[[str], None] | None = None) -> None:
        """Capture `sizes` (default: every bucket), largest first, into one memory pool."""
        sizes = sorted(sizes or self.sizes, reverse=True)
        started = time.perf_counter()
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        if self.logits is None:
            self.logits = torch.empty((self.sizes[-1], self.model.config.vocab_size),
                                      dtype=torch.float32, device=self.static.device)
        for i, size in enumerate(sizes):
            packed = self.static[:, :size]
            # Warm up outside capture first: Triton compiles and cuBLAS picks its kernels here.
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                decode_forward(self.model, self.cache, self.inputs, packed)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                self.logits[:size].copy_(
                    decode_forward(self.model, self.cache, self.inputs, packed))
            self.graphs[size] = graph
            if progress is not None and (i + 1 == len(sizes) or (i + 1) % 8 == 0):
                progress(f"captured {i + 1}/{len(sizes)} decode graphs "
                         f"({time.perf_counter() - started:.1f} s)")
        torch.cuda.synchronize()

    def release(self) -> None:
        self.graphs.clear()
        self.pool = self.logits = None

    def bucket(self, n: int) -> int | None:
        size = bucket_for(self.sizes, n)
        return size if size in self.graphs else None

    def replay(self, step: DecodeStep) -> torch.Tensor:
        """Logits [step.size, vocab] of a step padded to a captured bucket."""
        if step.packed.shape[0] != NUM_FIELDS or step.padded not in self.graphs:
            raise ValueError(f"no graph captured for a step of {step.padded} columns")
        self.static[:, :step.padded].copy_(step.packed)
        self.graphs[step.padded].replay()
        self.num_replays += 1
        return self.logits[:step.size]
