"""Settings: `ModelConfig` (what the checkpoint is) and `EngineConfig` (how to run it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tandem.engine.errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class Llama3RopeScaling(BaseModel):
    """Llama 3.1-style RoPE frequency scaling."""

    model_config = ConfigDict(frozen=True)

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


class ModelConfig(BaseModel):
    """Architecture of a Llama-family checkpoint; one model class, differences are fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: str = Field(description="Family name: llama, mistral or qwen2.")
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None = None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = Field(description="Q/K/V projections carry a bias (Qwen2).")
    sliding_window: int | None = Field(None, description="Attention window; refused if active.")

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        return self

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Read a transformers `config.json` (v4 or v5 key names)."""
        arch_names = cfg.get("architectures") or []
        family = next((SUPPORTED_ARCHITECTURES[a] for a in arch_names
                       if a in SUPPORTED_ARCHITECTURES), None)
        if family is None:
            raise UnsupportedModelError(
                f"unsupported architecture {arch_names or cfg.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {cfg['hidden_act']!r}")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise UnsupportedModelError(f"unsupported RoPE scaling type {rope_type!r}")
        scaling = Llama3RopeScaling(**{k: rope[k] for k in Llama3RopeScaling.model_fields}) \
            if rope_type == "llama3" else None
        window = cfg.get("sliding_window")
        if family == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        heads = cfg["num_attention_heads"]
        return cls(
            architecture=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=family == "qwen2" or cfg.get("attention_bias", False),
            sliding_window=window,
        )


class EngineConfig(BaseModel):
    """How to run one engine. Validated at construction and never mutated afterwards."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(
        None, description="HF directory or .gguf file; None = embedded SmolLM2-135M-Instruct.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Serving dtype of weights and KV cache.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = cuda when available, else cpu.")
    block_size: int = Field(16, gt=0, le=1024, description="Tokens per KV block.")
    kv_cache_gb: float | None = Field(
        None, gt=0, description="Memory for the KV block pool, GiB. Default: 1 GiB on CPU; on "
        "CUDA, what gpu_memory_utilization leaves after the weights, the activations of the "
        "largest step and the CUDA graphs.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of the GPU's memory this engine may use (CUDA, when "
        "kv_cache_gb is not given).")
    num_kv_blocks: int | None = Field(
        None, gt=0, description="Size of the block pool; overrides kv_cache_gb.")
    cuda_graphs: bool = Field(
        True, description="On CUDA, replay captured graphs for decode-only steps (one per batch "
        "size bucket); prefill and mixed steps run eagerly. Ignored on CPU.")
    max_num_seqs: int = Field(64, gt=0, description="Most sequences in one running batch.")
    offload_micro_batches: int = Field(
        2, ge=1, le=2, description="Sequences decoding with offloaded attention run as this "
        "many micro-batches: 2 is the ping-pong pipeline (one's dense layers run here while "
        "the other's attention runs on the attention workers), 1 runs them as one.")
    max_num_batched_tokens: int = Field(
        2048, gt=0, description="Token budget of one step (prefill chunks + decodes).")
    max_model_len: int | None = Field(
        None, gt=0, description="Longest prompt + output; default: the model's context length.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of equal prefixes.")
    num_threads: int | None = Field(
        None, gt=0, description="torch CPU threads; None leaves torch's default.")

    @model_validator(mode="after")
    def _check_budget(self) -> EngineConfig:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                f"max_num_seqs={self.max_num_seqs} so every running sequence can decode"
            )
        return self
