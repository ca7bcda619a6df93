"""`LLMEngine`: requests in, one scheduled step at a time, outputs back.

Lifecycle of a request: waiting -> running (prefill chunks, then decode) -> finished.
Split by phase for disaggregation:
- prefill engine: `add_request(..., prefill_only=True)` -> one step output with the first
  token -> `export_kv` (or per-layer KV via `on_layer_kv` while it computes) -> `release`;
- decode engine: `import_request(prompt, [first token], kv)` -> running -> finished.
A request can also start from KV loaded for a prefix (`prefix_kv`), e.g. from the KV store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from tandem.engine.attention import LayerKVCallback
from tandem.engine.blend import BlendResult
from tandem.engine.block_manager import BlockManager
from tandem.engine.config import EngineConfig
from tandem.engine.errors import EngineError, OutOfBlocksError
from tandem.engine.handoff import PhaseHandoff
from tandem.engine.host_memory import keep_freed_memory
from tandem.engine.kv_cache import DTYPES, KVBlocks, KVCache, KVSpec
from tandem.engine.loader import LoadedModel, load_model
from tandem.engine.model_runner import ModelRunner
from tandem.engine.offload import KV_LOST
from tandem.engine.output_processor import OutputProcessor
from tandem.engine.outputs import EngineStats, RequestOutput
from tandem.engine.sampler import Sampler
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.scheduler import ScheduledChunk, Scheduler
from tandem.engine.sequence import Sequence, SequenceStatus
from tandem.engine.sizing import max_model_len, num_kv_blocks

logger = logging.getLogger(__name__)


class LLMEngine(PhaseHandoff):
    """One model with its own KV block pool; `loaded` lets engines in a process share weights."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        want_cuda = config.device == "cuda" or (
            config.device == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise EngineError("device='cuda' requested but CUDA is not available")
        self.device = torch.device("cuda" if want_cuda else "cpu")
        if self.device.type == "cpu":
            keep_freed_memory()
        if loaded is None:
            loaded = load_model(config.model, DTYPES[config.dtype], self.device)
        self.loaded = loaded
        self.model_config, self.tokenizer = loaded.config, loaded.tokenizer
        self.fingerprint = loaded.fingerprint
        self.max_model_len = max_model_len(self.model_config, config)
        self.kv_spec = KVSpec(
            num_layers=self.model_config.num_layers, num_kv_heads=self.model_config.num_kv_heads,
            head_dim=self.model_config.head_dim, dtype=config.dtype, block_size=config.block_size)
        num_blocks = num_kv_blocks(config, loaded.model, self.kv_spec, self.max_model_len,
                                   self.device)
        # One block more than the block manager hands out: padded decode rows write there.
        self.cache = KVCache(self.kv_spec, num_blocks + 1, self.device)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.blocks)
        self.eos_token_id = self.tokenizer.eos_token_id
        self.sampler = Sampler(self.model_config.vocab_size, self.eos_token_id, self.device)
        self.runner = ModelRunner(loaded.model, self.cache, config, self.max_model_len,
                                  self.sampler, scratch_block=num_blocks)
        self.outputs = OutputProcessor(self.tokenizer, self.max_model_len)
        self.seqs: dict[str, Sequence] = {}
        logger.info("engine ready: %d KV blocks of %d tokens (%.2f GiB), max_model_len %d",
                    num_blocks, config.block_size,
                    num_blocks * self.kv_spec.bytes_per_block / 2**30, self.max_model_len)
        if self.runner.graphs is not None:
            logger.info("capturing CUDA graphs for decode batches of %s sequences",
                        ", ".join(map(str, self.runner.graphs.sizes)))
            self.runner.capture_graphs(progress=lambda line: logger.info("%s", line))

    # -- requests ------------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
        prefill_only: bool = False, on_layer_kv: LayerKVCallback | None = None,
        prefix_kv: KVBlocks | None = None, blended: BlendResult | None = None,
        on_preempt: Callable[[list[int]], None] | None = None,
    ) -> None:
        """Queue a request. `prefix_kv` holds KV already computed for its first tokens;
        `blended`, KV blended for them (only its exact part may enter the prefix cache).
        `on_preempt` gets its blocks, pinned, when a preemption would free them."""
        if prefix_kv is not None and blended is not None:
            raise ValueError("give prefix_kv or blended, not both")
        seq = self._new_sequence(request_id, list(prompt_token_ids), params)
        seq.prefill_only, seq.on_layer_kv, seq.on_preempt = prefill_only, on_layer_kv, on_preempt
        kv = blended.kv if blended is not None else prefix_kv
        if kv is not None:
            if kv.num_tokens >= seq.num_tokens:
                raise ValueError(
                    f"prefix_kv covers {kv.num_tokens} tokens; it must leave at least "
                    f"one of the {seq.num_tokens} prompt tokens to compute")
            if blended is not None and blended.exact_tokens < kv.num_tokens:
                seq.cacheable_tokens = blended.exact_tokens  # nothing after it is exact either
            elif not kv.exact:
                seq.cacheable_tokens = 0
            self._load_kv(seq, kv)
            if blended is not None:
                seq.num_cached_tokens = blended.cached_tokens
                seq.num_recomputed_tokens = blended.recomputed_tokens
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def _new_sequence(self, request_id: str, prompt: list[int], params: SamplingParams,
                      offloaded: bool = False) -> Sequence:
        if request_id in self.seqs:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not prompt:
            raise ValueError("prompt: is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt: token id {bad!r} is outside the vocabulary [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt: {len(prompt)} tokens leave no room to generate within "
                             f"max_model_len={self.max_model_len}")
        longest = min(len(prompt) + params.max_tokens, self.max_model_len)
        if not offloaded and self.kv_spec.num_blocks_for(longest) > self.blocks.num_blocks:
            raise ValueError(
                f"max_tokens: prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) needs "
                f"more KV blocks than the engine has ({self.blocks.num_blocks}); "
                "lower max_tokens or raise kv_cache_gb")
        return Sequence(request_id, prompt, len(prompt), params)

    def _load_kv(self, seq: Sequence, kv: KVBlocks) -> None:
        if not self.blocks.grow(seq, kv.num_tokens):
            raise OutOfBlocksError(f"request {seq.request_id}: not enough free KV blocks to "
                                   f"load {kv.num_tokens} tokens of KV")
        try:
            self.cache.load(seq.block_table, kv)
        except BaseException:  # the sequence is not registered yet: nobody else frees them
            self.blocks.free_blocks(seq)
            raise
        seq.num_computed_tokens = seq.num_cached_tokens = kv.num_tokens
        self.blocks.register_full_blocks(seq)

    # -- stepping ------------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def scheduled_request_ids(self) -> list[str]:
        """Requests waiting for or in the batch (not reserved, not prefilled)."""
        return [s.request_id for s in (*self.scheduler.running, *self.scheduler.waiting)]

    def step(self) -> list[RequestOutput]:
        """Run one batch; outputs for the requests that produced a token (or finished)."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        sampled = [c.seq for c in batch if c.completes]
        result = self.runner.execute(batch)
        for chunk in batch:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            if chunk.seq.offload is None:
                self.blocks.register_full_blocks(chunk.seq)
        if result is None:
            return []
        outputs = []
        for seq, token, logprobs, error in zip(sampled, result.token_ids, result.logprobs,
                                               result.errors, strict=True):
            self.outputs.append(seq, token, logprobs, error)
            if seq.offload is not None and seq.offload.lost is not None:
                seq.finish_reason = KV_LOST  # it resumes elsewhere, not a failure
            if seq.finish_reason is not None or seq.prefill_only:
                self._retire(seq)
            outputs.append(self.outputs.output(seq))
        return outputs

    def cached_prefix(self, token_ids: list[int], cache_salt: str | None = None) \
            -> KVBlocks | None:
        """A copy of the KV the prefix cache holds for the leading whole blocks of
        `token_ids` (leaving at least one token) under `cache_salt`; None on a miss."""
        probe = Sequence("prefix-probe", list(token_ids), len(token_ids),
                         SamplingParams(cache_salt=cache_salt))
        hits = self.blocks.match_prefix(probe)
        return self.cache.export(hits, len(hits) * self.config.block_size) if hits else None

    def score(self, token_ids: list[int], prefix_kv: KVBlocks | None = None) -> torch.Tensor:
        """Teacher-forced float32 logits [n, vocab] predicting each token after the first
        `prefix_kv.num_tokens` (or all tokens), computed in one pass outside the batch."""
        seq = self._new_sequence(f"score-{id(token_ids)}", list(token_ids), SamplingParams())
        try:
            if prefix_kv is not None:
                self._load_kv(seq, prefix_kv)
            n = seq.num_uncomputed_tokens
            if not self.blocks.grow(seq, seq.num_tokens):
                raise EngineError("not enough free KV blocks to score the sequence")
            return self.runner.logits([ScheduledChunk(seq, n)])
        finally:
            self.blocks.free_blocks(seq)

    def _retire(self, seq: Sequence) -> None:
        """Take a sequence out of the batch; prefill-only ones keep their blocks for export."""
        self.scheduler.remove(seq)
        if seq.prefill_only:  # failed ones too: the owner frees them once no send reads them
            seq.status = SequenceStatus.PREFILLED
            return
        seq.status = SequenceStatus.FINISHED
        self.blocks.free_blocks(seq)
        if seq.offload is not None:
            seq.offload.release()
        del self.seqs[seq.request_id]

    # -- control -------------------------------------------------------------------------------

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks; None if it is unknown."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        seq.finish_reason = "abort"
        self.release(request_id)
        seq.status = SequenceStatus.FINISHED
        return self.outputs.output(seq)

    def _get(self, request_id: str) -> Sequence:
        seq = self.seqs.get(request_id)
        if seq is None:
            raise EngineError(f"unknown request {request_id!r}")
        return seq

    def stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=len(self.scheduler.waiting), num_running=len(self.scheduler.running),
            num_prefilled=sum(s.status == SequenceStatus.PREFILLED for s in self.seqs.values()),
            num_reserved=sum(s.status == SequenceStatus.RESERVED for s in self.seqs.values()),
            num_blocks=self.blocks.num_blocks, num_free_blocks=self.blocks.num_free_blocks,
            num_prefix_hit_blocks=self.blocks.num_prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            graph_replays=self.runner.num_graph_replays)
