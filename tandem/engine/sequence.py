"""A request's state inside one engine: its tokens, its blocks, how far it has been computed."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import TYPE_CHECKING

from tandem.engine.attention import LayerKVCallback
from tandem.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tandem.engine.offload import OffloadedSequence
    from tandem.engine.sampler import TokenLogprobs
    from tandem.engine.stop_strings import StopStringMatcher


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
    # Called with its blocks, pinned, when a preemption is about to free them (a transport may
    # still read them): the callee gives them back with `LLMEngine.unpin_blocks`.
    on_preempt: Callable[[list[int]], None] | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the leading full blocks
    block_table_epoch: int = 0  # bumped whenever the table is emptied (cached copies go stale)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV was reused or loaded, not computed
    num_recomputed_tokens: int = 0  # blended chunk tokens recomputed through the deep layers
    cacheable_tokens: int | None = None  # blocks past this may not enter the prefix cache
    finish_reason: str | None = None
    text: str | None = None  # set when a stop string cut the output
    error: str | None = None  # why the request failed (finish_reason "error")
    seed: int = 0  # the draws' seed: the request's, else a random one
    output_logprobs: list[TokenLogprobs] | None = None  # per output token, when asked
    stop_matcher: StopStringMatcher | None = None  # incremental stop-string search
    # Where its KV is when attention is offloaded (attention workers); it holds no blocks then.
    offload: OffloadedSequence | None = None

    def __post_init__(self) -> None:
        self.seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        if self.params.logprobs is not None:
            self.output_logprobs = []

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
