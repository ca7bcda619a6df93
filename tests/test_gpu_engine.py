"""The CUDA decode path (skipped without CUDA): graphs against eager, no host synchronisation in
a step but the one copy, fp32 parity with HF on a 1B-shaped model, seeded draws equal to the
CPU's. Models are random-weight HF directories built here, with a word-level tokenizer: nothing
is downloaded, and the shipped GGUF is not needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TINY = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True)
LLAMA_1B = dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                tie_word_embeddings=True, rope_theta=500000.0,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def build_model(directory: Path, shape: dict, std: float = 0.02) -> Path:
    """A random-weight Llama of `shape` (fp32, weights of `std`) with a word-level tokenizer."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    config = transformers.LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5,
                                      bos_token_id=1, eos_token_id=2, **shape)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, std)
    model.save_pretrained(directory, safe_serialization=True)
    vocab = {f"w{i}": i for i in range(shape["vocab_size"])}
    Tokenizer(WordLevel(vocab, unk_token="w0")).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "w1", "eos_token": "w2"}))
    return directory


def engine_for(path: Path, device: str = "cuda", **overrides) -> LLMEngine:
    settings = dict(model=str(path), dtype="float32", device=device, kv_cache_gb=1.0,
                    max_model_len=1024, max_num_seqs=16) | overrides
    return LLMEngine(EngineConfig(**settings))


def generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) \
        -> list[list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    return [done[f"r{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny"), TINY)


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def prompts(n: int, length: int = 24, vocab: int = 4096) -> list[list[int]]:
    gen = torch.Generator().manual_seed(n)
    return torch.randint(3, vocab, (n, length), generator=gen).tolist()


def test_graphs_give_the_eager_tokens(tiny):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    eager = generate(engine_for(tiny, cuda_graphs=False), prompts(5), params)
    graphed = engine_for(tiny)
    assert generate(graphed, prompts(5), params) == eager
    assert graphed.stats().graph_replays > 0


def test_a_decode_step_synchronises_only_for_its_result(tiny):
    engine = engine_for(tiny)
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=3,
                             ignore_eos=True, logprobs=2)]
    for i, (prompt, p) in enumerate(zip(prompts(2), params, strict=True)):
        engine.add_request(f"r{i}", prompt, p)
    engine.step()  # the prefill (eager, with its own uploads)
    decode_without_syncs(engine, 8)
    assert engine.stats().graph_replays >= 8


def decode_without_syncs(engine: LLMEngine, steps: int) -> None:
    """Run decode steps with CUDA's sync debug mode raising on any host synchronisation."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            assert engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_fp32_logits_match_hf_on_a_1b_shaped_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = build_model(tmp_path, LLAMA_1B)
    ids = prompts(1, 64, LLAMA_1B["vocab_size"])[0]
    engine = engine_for(path, cuda_graphs=False)
    ours = engine.score(ids)
    del engine
    torch.cuda.empty_cache()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa").cuda().eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids], device="cuda")).logits[0].float().cpu()
    assert (ours - theirs).abs().max().item() < 1e-3


def test_seeded_tokens_equal_the_cpus(tiny):
    params = SamplingParams(max_tokens=16, temperature=0.7, top_p=0.95, seed=99,
                            ignore_eos=True)
    on_cpu = generate(engine_for(tiny, device="cpu"), prompts(3), params)
    assert generate(engine_for(tiny), prompts(3), params) == on_cpu


PENALISED = [SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.3,
                            presence_penalty=0.5, frequency_penalty=0.4, ignore_eos=True),
             SamplingParams(max_tokens=16, temperature=0.8, seed=7, repetition_penalty=1.2,
                            frequency_penalty=0.3, ignore_eos=True, logprobs=1),
             SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, min_tokens=4)]


def generate_each(engine: LLMEngine, params: list[SamplingParams]) -> list[list[int]]:
    for i, (prompt, p) in enumerate(zip(prompts(len(params)), params, strict=True)):
        engine.add_request(f"r{i}", prompt, p)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    return [done[f"r{i}"] for i in range(len(params))]


def test_penalised_tokens_equal_the_cpus(tiny):
    on_cpu = generate_each(engine_for(tiny, device="cpu"), PENALISED)
    assert generate_each(engine_for(tiny), PENALISED) == on_cpu


def test_a_penalised_decode_step_synchronises_only_for_its_result(tiny):
    engine = engine_for(tiny)
    for i, (prompt, p) in enumerate(zip(prompts(3), PENALISED, strict=True)):
        engine.add_request(f"r{i}", prompt, p)
    engine.step()
    decode_without_syncs(engine, 8)
