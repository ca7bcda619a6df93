"""What the engine reports back for a request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tandem.engine.sampler import TokenLogprobs


@dataclass
class RequestOutput:
    """A request's state after a step: the generated tokens so far and, at the end, why it ended.

    `finish_reason` is "stop" (EOS, a stop token or a stop string; `text` is cut before the stop
    string), "length" (max_tokens or the context length), "abort", or "error" (this request
    alone failed, e.g. its logits were not finite; `error` says why); None while running.
    `logprobs` has one entry per output token when the request asked for them.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_cached_tokens: int = 0
    num_recomputed_tokens: int = 0  # blended chunk tokens recomputed (CacheBlend)
    logprobs: list[TokenLogprobs] | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    num_prefilled: int  # prefill-only requests holding blocks until exported and released
    num_reserved: int  # holding blocks for KV on its way from a prefill engine
    num_blocks: int
    num_free_blocks: int
    num_prefix_hit_blocks: int
    num_preemptions: int
    graph_replays: int = 0  # decode steps served by a captured CUDA graph
