"""The device side of a step: inputs up, the model, sampling, and one copy of the result back.

Decode-only steps take the fast path: inputs from `DecodeInputs` (block tables stay on the
device), and on CUDA the replay of a captured graph (`DecodeGraphs`). Every other step
(prefill, mixed, scoring) is built by `build_eager_step` and runs eagerly. Sampling runs on the
device (`Sampler`); the packed result is the step's only device-to-host copy, into pinned memory,
waited for on an event so nothing else in the step synchronises.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tandem.engine.batch_inputs import build_eager_step
from tandem.engine.config import EngineConfig
from tandem.engine.cuda_graphs import (
    DecodeGraphs,
    bucket_for,
    decode_forward,
    graph_batch_sizes,
)
from tandem.engine.decode_inputs import DecodeInputs
from tandem.engine.kv_cache import KVCache
from tandem.engine.model import LlamaModel
from tandem.engine.offload import OffloadTotals, offloaded_decode_step
from tandem.engine.sampler import Sampler, SampleResult
from tandem.engine.scheduler import ScheduledChunk
from tandem.engine.triton_ops import runs_on


class ModelRunner:
    """`scratch_block` is a block of `cache` that no request owns (padding writes there)."""

    def __init__(self, model: LlamaModel, cache: KVCache, config: EngineConfig,
                 max_model_len: int, sampler: Sampler, scratch_block: int) -> None:
        self.model, self.cache, self.sampler = model, cache, sampler
        self.device = cache.data.device
        self.use_triton = runs_on(self.device)
        self.decode_inputs = DecodeInputs(
            config.max_num_seqs, cache.spec.num_blocks_for(max_model_len),
            cache.spec.block_size, scratch_block, self.device)
        self.bucket_sizes = graph_batch_sizes(config.max_num_seqs)
        self.graphs: DecodeGraphs | None = None
        if self.use_triton and self.device.type == "cuda" and config.cuda_graphs:
            self.graphs = DecodeGraphs(model, cache, self.decode_inputs, self.bucket_sizes)
        self.pad_to_buckets = self.graphs is not None  # tests set it on CPU to pad as graphs do
        self.offload_micro_batches = config.offload_micro_batches
        self.offload_totals = OffloadTotals()

    @property
    def num_graph_replays(self) -> int:
        return self.graphs.num_replays if self.graphs is not None else 0

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledChunk]) -> SampleResult | None:
        """Compute `batch` (decodes first) and sample a token for each chunk that `completes`,
        in batch order; None when none completes."""
        sampled = [c.seq for c in batch if c.completes]
        inputs = self.sampler.prepare(sampled) if sampled else None  # uploads overlap the forward
        if any(c.seq.offload is not None for c in batch):
            assert inputs is not None  # offloaded chunks are decodes: they all sample
            logits, lost = self._mixed(batch)
            result = self.sampler.collect(self._to_host(self.sampler.sample(logits, inputs)),
                                          inputs)
            for row, why in lost.items():
                result.errors[row] = why
            return result
        if self._is_fast_decode(batch):
            logits = self._decode(batch)
        else:
            step = build_eager_step(batch, self.cache, self.use_triton)
            hidden = self.model(step.input_ids, step.positions, step.ctx)
            if inputs is None:
                return None
            logits = self.model.logits(hidden.index_select(0, step.sample_rows))
        if inputs is None:
            return None
        packed = self.sampler.sample(logits, inputs)
        return self.sampler.collect(self._to_host(packed), inputs)

    @torch.inference_mode()
    def logits(self, batch: list[ScheduledChunk]) -> torch.Tensor:
        """Float32 logits of every token of `batch` (teacher forcing), on the host."""
        step = build_eager_step(batch, self.cache, self.use_triton, all_logits=True)
        return self.model.logits(self.model(step.input_ids, step.positions, step.ctx)).cpu()

    def _mixed(self, batch: list[ScheduledChunk]) -> tuple[torch.Tensor, dict[int, str]]:
        """A batch with offloaded sequences: the local ones as usual, the offloaded ones with
        their attention on the attention workers; logits of the sampled rows, in batch order,
        and the rows whose offloaded KV was lost (by their index among the sampled)."""
        rows = {id(c): i for i, c in enumerate(c for c in batch if c.completes)}
        local = [c for c in batch if c.seq.offload is None]
        away = [c for c in batch if c.seq.offload is not None]
        step = offloaded_decode_step(
            self.model, [c.seq.offload for c in away], [c.seq.token_ids[-1] for c in away],
            [c.seq.num_computed_tokens for c in away], self.offload_micro_batches)
        self.offload_totals.add(step, len(away))
        logits = torch.empty(len(rows), step.logits.shape[-1], dtype=step.logits.dtype,
                             device=self.device)
        logits[[rows[id(c)] for c in away]] = step.logits
        lost = {}
        for i, why in step.lost.items():
            away[i].seq.offload.lost = why
            lost[rows[id(away[i])]] = why
        if local:
            if self._is_fast_decode(local):
                part = self._decode(local)
            else:
                eager = build_eager_step(local, self.cache, self.use_triton)
                hidden = self.model(eager.input_ids, eager.positions, eager.ctx)
                part = self.model.logits(hidden.index_select(0, eager.sample_rows))
            done = [rows[id(c)] for c in local if c.completes]
            if done:
                logits[done] = part.to(logits.dtype)
        return logits, lost

    def _is_fast_decode(self, batch: list[ScheduledChunk]) -> bool:
        return all(c.num_tokens == 1 and c.completes and c.seq.on_layer_kv is None
                   for c in batch)

    def _decode(self, batch: list[ScheduledChunk]) -> torch.Tensor:
        seqs = [c.seq for c in batch]
        padded = len(seqs)
        if self.pad_to_buckets:
            padded = bucket_for(self.bucket_sizes, padded) or padded
        step = self.decode_inputs.prepare(seqs, padded)
        if self.graphs is not None and self.graphs.bucket(len(seqs)) == step.padded:
            return self.graphs.replay(step)
        width = None if self.use_triton else step.max_context_len
        return decode_forward(self.model, self.cache, self.decode_inputs, step.packed,
                              width)[:step.size]

    def _to_host(self, packed: torch.Tensor) -> torch.Tensor:
        """The step's single device-to-host copy: into pinned memory, then wait on an event
        (not a stream or device synchronisation)."""
        if packed.device.type == "cpu":
            return packed
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return host

    def capture_graphs(self, progress: Callable[[str], None] | None = None) -> None:
        if self.graphs is not None:
            self.graphs.capture(progress=progress)
