"""Llama 3 (llama3 RoPE scaling), Qwen2 (QKV bias) and Mistral: tiny random-weight HF
directories load through the same loader and match HF logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tandem.engine.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.errors import UnsupportedModelError

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             vocab_size=49152, rms_norm_eps=1e-5)

CONFIGS = {
    "llama3": lambda: transformers.LlamaConfig(
        **SMALL, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=None),
}


def save_model(config, directory: Path, tokenizer) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if getattr(config, "attention_bias", False) or config.model_type == "qwen2":
        for layer in model.model.layers:  # make the biases matter
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(directory)
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "chat_template": tokenizer.chat_template}))
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_hf_model_matches_hf_logits(name, tmp_path, loaded_fp32):
    hf = save_model(CONFIGS[name](), tmp_path, loaded_fp32.tokenizer)
    engine = LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32", kv_cache_gb=0.01))
    assert engine.model_config.architecture == {"llama3": "llama"}.get(name, name)
    ids = torch.randint(0, 49152, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    diff = (engine.score(ids) - ref).abs().max().item()
    assert diff < 1e-3, diff
    assert engine.tokenizer.encode("hello world") == loaded_fp32.tokenizer.encode("hello world")


def test_sliding_window_model_is_refused_with_a_hint(tmp_path, loaded_fp32):
    config = transformers.MistralConfig(**SMALL, sliding_window=64)
    save_model(config, tmp_path, loaded_fp32.tokenizer)
    with pytest.raises(UnsupportedModelError, match=r"sliding-window.*max_model_len <= 64"):
        LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32", kv_cache_gb=0.01))
    engine = LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32", kv_cache_gb=0.01,
                                    max_model_len=64))
    assert engine.max_model_len == 64


def test_unsupported_architecture_names_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32"))
