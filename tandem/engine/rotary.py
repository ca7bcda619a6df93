"""Rotary position embedding (half-rotation convention, as HF Llama), with Llama 3 scaling."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tandem.engine.config import Llama3RopeScaling

Rope = tuple[torch.Tensor, torch.Tensor]


def inverse_frequencies(
    head_dim: int, theta: float, scaling: Llama3RopeScaling | None
) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq.float()
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    orig = scaling.original_max_position_embeddings
    low_wavelen = orig / scaling.low_freq_factor
    high_wavelen = orig / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, blended)
    return torch.where(wavelen < high_wavelen, inv_freq, scaled).float()


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables indexed by absolute position."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float,
        scaling: Llama3RopeScaling | None,
    ) -> None:
        super().__init__()
        self.head_dim, self.max_positions = head_dim, max_positions
        self.theta, self.scaling = theta, scaling
        # Per device, built once and never replaced: captured CUDA graphs hold their addresses.
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin [max_positions, D/2], built on first use (the model may start on meta)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._tables:
            inv_freq = inverse_frequencies(self.head_dim, self.theta, self.scaling)
            positions = torch.arange(self.max_positions, dtype=torch.float32)
            angles = torch.outer(positions, inv_freq).to(device)
            self._tables[device] = (angles.cos(), angles.sin())
        return self._tables[device]

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """cos/sin [T, 1, D/2] for `positions` [T]; looked up once per step, shared by layers."""
        cos_table, sin_table = self.tables(positions.device)
        return cos_table[positions].to(dtype).unsqueeze(1), \
            sin_table[positions].to(dtype).unsqueeze(1)


@dataclass
class Positions:
    """The positions of a forward pass's tokens; every layer rotates by the same angles, so the
    per-token cos/sin of the torch path are looked up once, on first use (the fused CUDA kernel
    reads the fp32 tables by position instead)."""

    ids: torch.Tensor  # [T] int64
    rotary: RotaryEmbedding
    _cos_sin: dict[torch.dtype, Rope] = field(default_factory=dict)

    def cos_sin(self, dtype: torch.dtype) -> Rope:
        if dtype not in self._cos_sin:
            self._cos_sin[dtype] = self.rotary.lookup(self.ids, dtype)
        return self._cos_sin[dtype]


def rotate(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate x [T, H, D] by R(p): each (i, i + D/2) pair turns by angle p * inv_freq[i]."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
