"""How much an engine holds: the longest sequence, and the KV pool's size.

On CPU the pool takes `kv_cache_gb` (1 GiB by default). On a GPU it takes what
`gpu_memory_utilization` leaves after the weights, the activations of the largest eager step
and the CUDA graphs (as vLLM sizes it). The KV pool must exist before graphs are captured
(they read it in place), so the graphs' memory is measured first with a throwaway pool, by
capturing the largest bucket alone: all graphs share one memory pool, so the largest one's
activations are what they all need.
"""

from __future__ import annotations

import gc
import logging

import torch

from tandem.engine.config import EngineConfig, ModelConfig
from tandem.engine.errors import EngineError, UnsupportedModelError
from tandem.engine.kv_cache import KVCache, KVSpec
from tandem.engine.model import LlamaModel
from tandem.engine.model_runner import ModelRunner
from tandem.engine.sampler import Sampler
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.scheduler import ScheduledChunk
from tandem.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

CPU_KV_CACHE_GB = 1.0  # the KV pool when kv_cache_gb is not given, off CUDA


def max_model_len(model: ModelConfig, config: EngineConfig) -> int:
    """The longest prompt + output: the configured one, within the model's context."""
    limit = model.max_position_embeddings
    wanted = config.max_model_len or limit
    if wanted > limit:
        raise ValueError(f"max_model_len={wanted} exceeds the model's context of {limit}")
    window = model.sliding_window
    if window is not None and window < wanted:
        raise UnsupportedModelError(
            f"sliding-window attention (window {window}) is not supported; "
            f"set max_model_len <= {window} to serve this model with full attention")
    return wanted


def num_kv_blocks(config: EngineConfig, model: LlamaModel, spec: KVSpec, max_len: int,
                  device: torch.device) -> int:
    """Blocks in the KV pool: `num_kv_blocks`, else `kv_cache_gb`, else the default above."""
    if config.num_kv_blocks:
        return config.num_kv_blocks
    if config.kv_cache_gb is not None:
        num_bytes = int(config.kv_cache_gb * 2**30)
    elif device.type == "cuda":
        num_bytes = cuda_kv_cache_bytes(config, model, spec, max_len, device)
    else:
        num_bytes = int(CPU_KV_CACHE_GB * 2**30)
    return max(1, num_bytes // spec.bytes_per_block)


def cuda_kv_cache_bytes(config: EngineConfig, model: LlamaModel, spec: KVSpec,
                        max_model_len: int, device: torch.device) -> int:
    """Bytes the KV pool may take on `device`, after profiling one largest step."""
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free  # the weights, and anything else on the GPU
    # The largest eager step: max_num_batched_tokens tokens, as prompts no longer than allowed.
    num_tokens = config.max_num_batched_tokens
    longest = max_model_len - 1
    lengths = [longest] * (num_tokens // longest) + ([num_tokens % longest] if num_tokens %
                                                      longest else [])
    num_blocks = sum(spec.num_blocks_for(n) for n in lengths) + config.max_num_seqs
    cache = KVCache(spec, num_blocks + 1, device)
    sampler = Sampler(model.config.vocab_size, None, device)
    runner = ModelRunner(model, cache, config, max_model_len, sampler, scratch_block=num_blocks)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    chunks, next_block = [], 0
    for i, n in enumerate(lengths):
        seq = Sequence(f"profile-{i}", [0] * n, n, SamplingParams(max_tokens=1))
        seq.status = SequenceStatus.RUNNING
        seq.block_table = list(range(next_block, next_block + spec.num_blocks_for(n)))
        next_block += len(seq.block_table)
        chunks.append(ScheduledChunk(seq, n))
    chunks.sort(key=lambda c: c.num_tokens != 1)  # as the scheduler orders a step
    runner.execute(chunks)
    _sample_widest_step(runner, config, model.config.vocab_size, device)
    torch.cuda.synchronize(device)
    activations = torch.cuda.max_memory_allocated(device) - base
    graphs = 0
    if runner.graphs is not None:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # what the profile step freed must not count as used here
        before = torch.cuda.mem_get_info(device)[0]
        runner.graphs.capture(sizes=[runner.graphs.sizes[-1]])
        graphs = max(0, before - torch.cuda.mem_get_info(device)[0])
        runner.graphs.release()
    del runner, cache, chunks
    gc.collect()
    torch.cuda.empty_cache()
    budget = int(total * config.gpu_memory_utilization) - in_use - activations - graphs
    logger.info("GPU memory: %.2f GiB total, %.2f in use before the KV pool, %.2f for a "
                "%d-token step, %.2f for CUDA graphs; %.2f GiB left for KV",
                total / 2**30, in_use / 2**30, activations / 2**30, num_tokens, graphs / 2**30,
                budget / 2**30)
    if budget < spec.bytes_per_block * spec.num_blocks_for(max_model_len):
        raise EngineError(
            f"no room for the KV cache of one {max_model_len}-token sequence within "
            f"gpu_memory_utilization={config.gpu_memory_utilization} ({budget / 2**30:.2f} GiB "
            "left): raise gpu_memory_utilization, lower max_num_batched_tokens or "
            "max_model_len, or set kv_cache_gb")
    return budget


def _sample_widest_step(runner: ModelRunner, config: EngineConfig, vocab_size: int,
                        device: torch.device) -> None:
    """Sample `max_num_seqs` rows the costly way (top-k, top-p, logprobs): the sampler's
    [batch, vocab] temporaries are a decode step's peak, not the model's activations."""
    params = SamplingParams(max_tokens=1, temperature=0.8, top_k=50, top_p=0.9, logprobs=20)
    seqs = [Sequence(f"sample-{i}", [0], 1, params) for i in range(config.max_num_seqs)]
    inputs = runner.sampler.prepare(seqs)
    logits = torch.randn((len(seqs), vocab_size), device=device)
    runner.sampler.sample(logits, inputs)
