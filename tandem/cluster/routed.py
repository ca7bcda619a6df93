"""What the router tracks per request: the request as routed, and where it runs now."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

from tandem.cluster.errors import WorkerUnavailable
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.segments import SegmentedPrompt
from tandem.prefill_worker.worker import PrefillResult


@dataclass
class RoutedRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    segments: SegmentedPrompt | None = None  # a segmented prompt (CacheBlend)
    prefill_worker: int | None = None  # pin to this prefill worker (tests, debugging)
    # Workers know the request by this id, fresh per request, so a client that reuses its
    # request_id never meets the previous request's leftovers (late aborts, streams).
    worker_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # filled in as the request moves along
    queue_s: float = 0.0
    prefill: PrefillResult | None = None
    num_cached_tokens: int = 0
    num_recomputed_tokens: int = 0  # blended chunk tokens recomputed in the deeper layers


@dataclass
class Placement:
    worker_id: str
    decode: Any | None = None  # None while the request waits for KV blocks
    prefill: Any | None = None
    prefill_task: asyncio.Future | None = None
    transport: str | None = None  # the KV transport the prefill worker was told to use
    aborted: bool = False
    turn: asyncio.Future | None = None  # its place in the admission queue
    prefill_index: int | None = None
    evicted: bool = False  # its decode worker is draining: the request moves elsewhere
    decode_slot: int | None = None
    block_ids: list[int] = field(default_factory=list)  # reserved on the decode worker
    # The request as the client sent it, and the tokens streamed so far (a move reads them).
    origin: RoutedRequest | None = None
    generated: list[int] | None = None
    moving: asyncio.Future | None = None  # its move to another decode worker (a `Move`)
    move_target: Any = None  # where it moves, once the pre-copy reserved blocks there
    moving_since: float = 0.0  # when it was suspended
    # Attention offload: (attention slot, first token, tokens, blocks) per KV range, the
    # attention workers holding them, and where the sequence goes when its tail is full.
    ranges: list[tuple[int, int, int, list[int]]] = field(default_factory=list)
    attention: list[Any] = field(default_factory=list)
    spill_to: list[int] = field(default_factory=list)


class WorkerLost(WorkerUnavailable):
    """A worker serving a request stopped answering: the request can resume elsewhere."""


class DecodeLost(WorkerLost):
    """The decode worker (or the KV receiver on it) is gone."""


class RequestMoving(WorkerLost):
    """Its decode worker suspended it so that it moves, KV and all, to another one."""


class AttentionLost(WorkerLost):
    """An attention worker holding part of its KV is gone: it resumes by recomputation."""


class PrefillLost(WorkerLost):
    """The prefill worker died before the handoff ended."""

    def __init__(self, message: str, index: int | None) -> None:
        super().__init__(message)
        self.index = index
