"""Result types returned by the client, each built from its protobuf message."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from tandem.proto.v1 import tandem_pb2 as pb


@dataclass(frozen=True)
class Usage:
    """Token counts for one request."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from a cache
    recomputed_tokens: int = 0  # blended chunk tokens (of `segments`) whose KV was recomputed

    @classmethod
    def from_proto(cls, msg: pb.Usage) -> Usage:
        """Convert a `tandem.v1.Usage` message."""
        return cls(msg.prompt_tokens, msg.completion_tokens, msg.cached_tokens,
                   msg.recomputed_tokens)


@dataclass(frozen=True)
class Timings:
    """Server-side latencies of one request, in seconds."""

    ttft_s: float
    total_s: float
    prefill_s: float
    handoff_s: float
    queue_s: float

    @classmethod
    def from_proto(cls, msg: pb.Timings) -> Timings:
        """Convert a `tandem.v1.Timings` message."""
        return cls(msg.ttft_s, msg.total_s, msg.prefill_s, msg.handoff_s, msg.queue_s)


@dataclass(frozen=True)
class ModelInfo:
    """A model served by the gateway."""

    id: str
    max_model_len: int
    fingerprint: str

    @classmethod
    def from_proto(cls, msg: pb.ModelInfo) -> ModelInfo:
        """Convert a `tandem.v1.ModelInfo` message."""
        return cls(msg.id, msg.max_model_len, msg.fingerprint)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's raw log-probability (log-softmax of the logits, before temperature) and the
    most likely alternatives at its position, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]

    @classmethod
    def from_proto(cls, msg: pb.TokenLogprob) -> TokenLogprob:
        return cls(msg.token_id, msg.logprob, [(t.token_id, t.logprob) for t in msg.top])


@dataclass(frozen=True)
class Chunk:
    """One streamed piece of a choice; its last one carries finish_reason, usage, timings.

    `index` names the choice (with `n` > 1 the choices' chunks interleave). `logprobs` has one
    entry per token when they were asked for; `prompt_logprobs` (on a choice's first chunk)
    one per prompt token from the second on."""

    text: str
    token_ids: list[int]
    request_id: str
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    index: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    @classmethod
    def from_proto(cls, msg: pb.GenerateResponse) -> Chunk:
        """Convert a `tandem.v1.GenerateResponse`; only a final message gets usage and timings."""
        final = bool(msg.finish_reason)
        return cls(msg.text, list(msg.token_ids), msg.request_id, msg.finish_reason or None,
                   Usage.from_proto(msg.usage) if final else None,
                   Timings.from_proto(msg.timings) if final else None, msg.index,
                   [TokenLogprob.from_proto(lp) for lp in msg.logprobs],
                   [TokenLogprob.from_proto(lp) for lp in msg.prompt_logprobs])


@dataclass(frozen=True)
class Completion:
    """A finished completion: all its text and tokens, with the server's usage and timings.

    With `n` > 1 this is choice 0, and `choices` holds every choice (each a Completion)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    request_id: str
    usage: Usage
    timings: Timings
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    index: int = 0
    choices: list[Completion] = field(default_factory=list, repr=False, compare=False)

    @property
    def ttft_s(self) -> float:
        """Time to first token as measured by the gateway, in seconds."""
        return self.timings.ttft_s

    @classmethod
    def from_chunks(cls, chunks: Sequence[Chunk]) -> Completion:
        """Join a full stream of chunks in which every choice ends with a final chunk."""
        by_choice: dict[int, list[Chunk]] = {}
        for chunk in chunks:
            by_choice.setdefault(chunk.index, []).append(chunk)
        choices = [cls._one(by_choice[i]) for i in sorted(by_choice)]
        if not choices:
            raise ValueError("no chunks")
        return replace(choices[0], choices=choices)

    @classmethod
    def _one(cls, chunks: list[Chunk]) -> Completion:
        last = chunks[-1]
        if last.finish_reason is None or last.usage is None or last.timings is None:
            raise ValueError("the last chunk must carry finish_reason, usage and timings")
        return cls(
            text="".join(c.text for c in chunks),
            token_ids=[t for c in chunks for t in c.token_ids],
            finish_reason=last.finish_reason,
            request_id=last.request_id,
            usage=last.usage,
            timings=last.timings,
            logprobs=[lp for c in chunks for lp in c.logprobs],
            prompt_logprobs=[lp for c in chunks for lp in c.prompt_logprobs],
            index=last.index,
        )
