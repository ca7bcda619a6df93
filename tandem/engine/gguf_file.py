"""Reading a GGUF checkpoint: architecture, dequantized weights under HF names, tokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, processors

from tandem.engine.config import ModelConfig
from tandem.engine.errors import ModelLoadError, UnsupportedModelError
from tandem.engine.tokenizer import Tokenizer

GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

# GGUF tensor name suffix -> HF name within a decoder layer.
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


class GGUFCheckpoint:
    """An open GGUF file."""

    def __init__(self, path: Path) -> None:
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises bare ValueError/struct errors on bad files
            raise ModelLoadError(f"{path}: not a readable GGUF file ({e})") from e
        self.path = path
        self.arch = str(self._field("general.architecture"))

    def _field(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def config(self) -> ModelConfig:
        if self.arch not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{self.path}: unsupported GGUF architecture {self.arch!r}; "
                f"supported: {', '.join(GGUF_ARCHITECTURES)}")
        a = self.arch
        heads = int(self._field(f"{a}.attention.head_count"))
        hidden = int(self._field(f"{a}.embedding_length"))
        names = {t.name for t in self.reader.tensors}
        vocab = self._field(f"{a}.vocab_size") or len(self._field("tokenizer.ggml.tokens"))
        return ModelConfig(
            architecture=GGUF_ARCHITECTURES[a],
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self._field(f"{a}.feed_forward_length")),
            num_layers=int(self._field(f"{a}.block_count")),
            num_heads=heads,
            num_kv_heads=int(self._field(f"{a}.attention.head_count_kv", heads)),
            head_dim=int(self._field(f"{a}.rope.dimension_count", hidden // heads)),
            rms_norm_eps=float(self._field(f"{a}.attention.layer_norm_rms_epsilon")),
            rope_theta=float(self._field(f"{a}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(self._field(f"{a}.context_length")),
            tie_word_embeddings="output.weight" not in names,
            attention_bias=a == "qwen2",
        )

    def tensors(self, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """Dequantized fp32 weights under HF names, Q/K un-permuted back to HF's layout."""
        for t in self.reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                continue
            array = gguf.quants.dequantize(t.data, t.tensor_type)
            array = array.reshape([int(d) for d in reversed(t.shape)])
            # llama.cpp's converter interleaves each head's rotary halves for Llama; undo it.
            if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
                array = _unpermute(array, heads)
            array = np.ascontiguousarray(array, dtype=np.float32)
            yield name, torch.from_numpy(array if array.flags.writeable else array.copy())

    def tokenizer(self) -> Tokenizer:
        kind = self._field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(
                f"{self.path}: GGUF tokenizer model {kind!r} is not supported (only 'gpt2' BPE); "
                "load the model from its Hugging Face directory instead")
        tokens = [str(t) for t in self._field("tokenizer.ggml.tokens")]
        types = list(self._field("tokenizer.ggml.token_type", []))
        merges = [tuple(str(m).split(" ", 1)) for m in self._field("tokenizer.ggml.merges")]
        backend = tokenizers.Tokenizer(models.BPE(
            vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if self._field("tokenizer.ggml.pre") == "smollm":  # llama.cpp splits digits one by one
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
                   for i, kind in enumerate(types)
                   if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)]
        backend.add_special_tokens(special)
        bos, eos = (self._token(tokens, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
        if self._field("tokenizer.ggml.add_bos_token", False) and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, tokens.index(bos))])
        return Tokenizer(backend, chat_template=self._field("tokenizer.chat_template"),
                         bos_token=bos, eos_token=eos)

    def _token(self, tokens: list[str], key: str) -> str | None:
        idx = self._field(key)
        return None if idx is None else tokens[int(idx)]


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
    return None  # e.g. rope_freqs: recomputed from the config


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)
