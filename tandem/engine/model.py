"""The Llama family in one module: Llama 2/3, Mistral, Qwen2, SmolLM2.

Grouped-query attention with RoPE, RMSNorm, SwiGLU; QKV bias and tied embeddings are config.
Q/K/V and gate/up projections are fused into one matmul each; the loader concatenates them.
On CUDA (with Triton) the small ops are fused kernels: RMSNorm with the residual add, RoPE with
the KV-cache write, SiLU-and-multiply; about 10 kernels a layer in a decode step. The CPU keeps
plain torch ops, whose outputs these kernels were checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.engine import triton_ops
from tandem.engine.attention import ForwardContext, paged_attention
from tandem.engine.config import ModelConfig
from tandem.engine.rotary import Positions, RotaryEmbedding, rotate


class Linear(nn.Module):
    """y = x W^T (+ b). Parameters start uninitialized: they are always loaded from a checkpoint."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: torch.Tensor | None = None

    def pack_for_cpu(self) -> None:
        """Pre-pack the weight for oneDNN: bf16 GEMV then reads at ~90% of memory bandwidth
        instead of ~55% through F.linear (measured on the 2-core avx512_bf16 machine)."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused(x):
            return triton_ops.rms_norm(x, self.weight, self.eps)
        # Normalize in fp32, scale in the serving dtype (as HF). F.rms_norm on a bf16 input
        # keeps bf16 internally on CPU and measurably degrades the model's output.
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)) \
            .to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) \
            -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): one kernel on CUDA."""
        if _fused(x):
            return triton_ops.add_rms_norm(x, residual, self.weight, self.eps)
        summed = residual + x
        return self(summed), summed


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Attention(nn.Module):
    """The attention block's projections; the attention itself is the caller's (paged over the
    block pool in a step, dense in blending, remote with attention offload)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, positions: Positions, ctx: ForwardContext | None) \
            -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k and v [T, Hkv, D] of normed hidden states, q and k rotated; with
        `ctx`, k and v are also stored in its cache at its slot mapping."""
        n, qkv = x.shape[0], self.qkv_proj(x)
        if _fused(x):  # RoPE and the cache write in one kernel
            k_pool, v_pool = ctx.cache.layer(self.layer) if ctx is not None else (None, None)
            return triton_ops.rope_and_cache(
                qkv, positions.ids, *positions.rotary.tables(x.device), self.num_heads,
                self.num_kv_heads, self.head_dim, k_pool, v_pool,
                ctx.slot_mapping if ctx is not None else None)
        # Rotate q and k in one go: they sit side by side in the fused projection.
        qk = rotate(qkv[:, :self.q_size + self.kv_size].view(n, -1, self.head_dim),
                    positions.cos_sin(x.dtype))
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, self.q_size + self.kv_size:].view(n, self.num_kv_heads, self.head_dim)
        if ctx is not None:
            ctx.cache.write(self.layer, ctx.slot_mapping, k, v)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if _fused(x):
            return self.down_proj(triton_ops.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """One layer, callable as two halves around attention: `pre_attn` (norm, QKV, RoPE, and
    the cache write when given a context) and `post_attn` (o_proj, residual, MLP). Whatever
    computes the attention in between (the paged kernels, blending, a remote attention worker)
    sees only q, k and v."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def pre_attn(self, hidden: torch.Tensor, positions: Positions,
                 ctx: ForwardContext | None = None) \
            -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [T, hidden] -> (q, k, v, residual)."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(hidden), positions, ctx)
        return q, k, v, hidden

    def post_attn(self, attn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """attention output [T, Hq, D] and the residual -> the layer's output [T, hidden]."""
        attn = self.self_attn
        normed, x = self.post_attention_layernorm.add_forward(
            attn.o_proj(attn_out.reshape(attn_out.shape[0], attn.q_size)), residual)
        return x + self.mlp(normed)

    def forward(self, hidden: torch.Tensor, positions: Positions, ctx: ForwardContext) \
            -> torch.Tensor:
        q, k, v, residual = self.pre_attn(hidden, positions, ctx)
        out = paged_attention(self.self_attn.layer, q, k, v, ctx, self.self_attn.scale)
        return self.post_attn(out, residual)


class LlamaModel(nn.Module):
    """Decoder stack plus LM head; `forward` returns hidden states, `logits` projects them."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(
            cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        at = Positions(positions, self.rotary)  # RoPE angles looked up once, for every layer
        for layer in self.layers:
            x = layer(x, at, ctx)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] for final hidden states [N, hidden]."""
        return self.lm_head(self.norm(hidden)).float()

    def pack_for_cpu(self) -> None:
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack_for_cpu()


def _fused(x: torch.Tensor) -> bool:
    """Whether to run the fused Triton kernels (on CUDA; see `triton_ops.runs_on`)."""
    return triton_ops.runs_on(x.device)
