"""The paged KV cache: its layout (`KVSpec`), the block pool tensor, and exported blocks.

One tensor holds every layer's keys and values:

    data[layer, 0 = key | 1 = value, block, slot_in_block, kv_head, head_dim]

so one (layer, K|V, block) is a contiguous run of `block_size * num_kv_heads * head_dim` values.
Keys are stored after RoPE. The store and the transports move KV in this layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


class KVSpec(BaseModel):
    """Shape and dtype of a model's paged KV cache: what two engines must agree on to swap KV."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_layers: int = Field(gt=0, description="Transformer layers.")
    num_kv_heads: int = Field(gt=0, description="Key/value heads per layer.")
    head_dim: int = Field(gt=0, description="Dimension of one head.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(description="Element type.")
    block_size: int = Field(gt=0, description="Tokens per KV block.")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def bytes_per_region(self) -> int:
        """Bytes of one (layer, K|V, block): the contiguous unit of the pool."""
        return self.bytes_per_block // (self.num_layers * 2)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


@dataclass
class KVBlocks:
    """KV for the first `num_tokens` tokens of a sequence, as whole blocks.

    `data` has shape [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]; slots past
    `num_tokens` in the last block are padding.
    """

    spec: KVSpec
    num_tokens: int
    data: torch.Tensor
    # False when the KV is an approximation (decoded from a lossy code): it may be computed on,
    # but never shared as a prefix, where it would pass for the exact KV of its tokens.
    exact: bool = True

    def __post_init__(self) -> None:
        s = self.spec
        want = (s.num_layers, 2, s.num_blocks_for(self.num_tokens), s.block_size,
                s.num_kv_heads, s.head_dim)
        if tuple(self.data.shape) != want:
            raise ValueError(f"KVBlocks data has shape {tuple(self.data.shape)}, expected {want}")
        if self.data.dtype != s.torch_dtype:
            raise ValueError(f"KVBlocks data has dtype {self.data.dtype}, spec says {s.dtype}")


class KVCache:
    """The block pool: one preallocated tensor in the layout above."""

    def __init__(self, spec: KVSpec, num_blocks: int, device: torch.device) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        # Zeroed, not empty: padded attention reads unused slots and 0 * NaN would poison it.
        self.data = torch.zeros(
            (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim),
            dtype=spec.torch_dtype,
            device=device,
        )

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value pools of one layer, each [num_blocks, block_size, kv_heads, head_dim]."""
        return self.data[layer, 0], self.data[layer, 1]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values [n, kv_heads, head_dim] at flat slots (block * block_size + i)."""
        k_pool, v_pool = self.layer(layer)
        k_pool.view(-1, *k_pool.shape[2:])[slots] = k
        v_pool.view(-1, *v_pool.shape[2:])[slots] = v

    def gather(self, layers: range, block_ids: list[int]) -> torch.Tensor:
        """A copy of `layers` x `block_ids`, shape [len(layers), 2, len(block_ids), ...]."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.data.device)
        return self.data[layers.start:layers.stop].index_select(2, index)

    def scatter(self, layers: range, block_ids: list[int], data: torch.Tensor) -> None:
        """Write `data` (as `gather` returns it) into `layers` x `block_ids`."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.data.device)
        self.data[layers.start:layers.stop].index_copy_(2, index, data.to(self.data.device))

    def export(self, block_ids: list[int], num_tokens: int) -> KVBlocks:
        index = torch.tensor(block_ids, dtype=torch.long, device=self.data.device)
        data = self.data.index_select(2, index).cpu()
        return KVBlocks(self.spec, num_tokens, data)

    def load(self, block_ids: list[int], kv: KVBlocks) -> None:
        """Copy exported blocks into this pool's `block_ids` (same spec required)."""
        if kv.spec != self.spec:
            raise ValueError(f"KV spec mismatch: got {kv.spec}, this engine uses {self.spec}")
        n = kv.data.shape[2]
        if len(block_ids) < n:
            raise ValueError(f"need {n} blocks to load KV, got {len(block_ids)}")
        index = torch.tensor(block_ids[:n], dtype=torch.long, device=self.data.device)
        self.data.index_copy_(2, index, kv.data.to(self.data.device))
