"""A request's state inside one engine: its tokens, its blocks, how far it has been computed."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from tandem.engine.attention import LayerKVCallback
from tandem.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()  # queued; may already hold blocks with loaded KV
    RUNNING = auto()  # in the batch: prefilling chunk by chunk, then decoding
    PREFILLED = auto()  # prefill-only request done; holds its blocks until released
    RESERVED = auto()  # holds blocks for a prompt whose KV arrives from another engine
    FINISHED = auto()


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    prefill_only: bool = False
    on_layer_kv: LayerKVCallback | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the leading full blocks
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV was reused or loaded, not computed
    num_recomputed_tokens: int = 0  # blended chunk tokens recomputed through the deep layers
    cacheable_tokens: int | None = None  # blocks past this may not enter the prefix cache
    finish_reason: str | None = None
    text: str | None = None  # set when a stop string cut the output
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
