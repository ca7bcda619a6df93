"""Argument validation, request building and channel options shared by Client and AsyncClient."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real

import grpc

from tandem.proto.v1 import tandem_pb2 as pb

TANDEM_SERVICE = "tandem.v1.Tandem"
HEALTH_SERVICE = "grpc.health.v1.Health"
# Safe to repeat, so retried on UNAVAILABLE. Generate is not: a retry could run it twice.
IDEMPOTENT_METHODS = (
    (TANDEM_SERVICE, "Tokenize"),
    (TANDEM_SERVICE, "ListModels"),
    (TANDEM_SERVICE, "Abort"),
    (HEALTH_SERVICE, "Check"),
)
MAX_ATTEMPTS_CAP = 5  # gRPC treats anything above 5 as 5
HEALTH_TIMEOUT_S = 1.0  # health() should answer quickly even when nothing is listening

Prompt = str | Sequence[int]
Message = Mapping[str, str]


def service_config(max_retries: int) -> dict:
    """The gRPC service config: retry idempotent methods on UNAVAILABLE, up to `max_retries`."""
    if max_retries < 0:
        raise ValueError(f"max_retries={max_retries} must be >= 0")
    if max_retries == 0:  # gRPC requires maxAttempts >= 2 in a retryPolicy
        return {}
    policy = {
        "maxAttempts": min(max_retries + 1, MAX_ATTEMPTS_CAP),
        "initialBackoff": "0.1s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    names = [{"service": service, "method": method} for service, method in IDEMPOTENT_METHODS]
    return {"methodConfig": [{"name": names, "retryPolicy": policy}]}


def channel_options(max_retries: int) -> list[tuple[str, str | int]]:
    """Options for `grpc.*_channel`: built-in retries for the idempotent methods."""
    config = service_config(max_retries)
    return [("grpc.enable_retries", 1 if config else 0),
            ("grpc.service_config", json.dumps(config))]


def channel_credentials(
    tls: bool, root_certificates: bytes | None, client_certificate: bytes | None = None,
    client_key: bytes | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials (with a client certificate for mTLS), or None for a plaintext channel."""
    if (client_certificate is None) != (client_key is None):
        raise ValueError("client_certificate and client_key go together")
    if tls:
        return grpc.ssl_channel_credentials(root_certificates, client_key, client_certificate)
    if root_certificates is not None or client_certificate is not None:
        raise ValueError("root_certificates and client certificates need tls=True")
    return None


def call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata every call carries: the API key as a bearer token, when there is one."""
    if api_key is None:
        return ()
    if not api_key or any(c.isspace() for c in api_key):
        raise ValueError("api_key must be a non-empty string without whitespace")
    return (("authorization", f"Bearer {api_key}"),)


def _prompt_field(request: pb.GenerateRequest, prompt: Prompt) -> None:
    """Set the request's `text` or `token_ids` from a str or a list of token ids."""
    if isinstance(prompt, str):
        request.text = prompt
        return
    if not isinstance(prompt, Sequence) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        raise TypeError("prompt must be a str or a list of int token ids")
    if any(t < 0 for t in prompt):
        raise ValueError("prompt token ids must be >= 0")
    request.token_ids.ids.extend(prompt)


def _messages_field(request: pb.GenerateRequest, messages: Sequence[Message]) -> None:
    """Set the request's `messages` from dicts with "role" and "content"."""
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not {"role", "content"} <= message.keys():
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        request.messages.messages.add(role=message["role"], content=message["content"])
    if not messages:
        request.messages.SetInParent()  # an empty list still selects the `messages` input


def _segments_field(
    request: pb.GenerateRequest,
    segments: Sequence[str],
    recompute_ratio: float | None,
    blend: bool | None,
) -> None:
    """Set the request's `segments`; options left as None stay unset (the server's defaults)."""
    if isinstance(segments, str) or not isinstance(segments, Sequence) or not all(
        isinstance(text, str) for text in segments
    ):
        raise TypeError("segments must be a list of str: prefix, chunk..., question")
    if len(segments) < 2:
        raise ValueError("segments needs at least a prefix (may be empty) and a question")
    request.segments.texts.extend(segments)
    if recompute_ratio is not None:
        if isinstance(recompute_ratio, bool) or not isinstance(recompute_ratio, Real):
            raise TypeError(f"recompute_ratio={recompute_ratio!r} must be a number")
        if math.isnan(recompute_ratio) or not 0 <= recompute_ratio <= 1:
            raise ValueError(f"recompute_ratio={recompute_ratio} must be in [0, 1]")
        request.segments.recompute_ratio = recompute_ratio
    if blend is not None:
        if not isinstance(blend, bool):
            raise TypeError(f"blend={blend!r} must be a bool")
        request.segments.blend = blend


def build_generate_request(
    prompt: Prompt | None,
    *,
    messages: Sequence[Message] | None,
    segments: Sequence[str] | None,
    recompute_ratio: float | None,
    blend: bool | None,
    max_tokens: int | None,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: str | Sequence[str] | None,
    request_id: str | None,
    model: str | None,
    ignore_eos: bool,
    cache_salt: str | None = None,
    options: SamplingExtras | None = None,
) -> pb.GenerateRequest:
    """Validate generate()/stream() arguments and build the GenerateRequest."""
    if sum(x is not None for x in (prompt, messages, segments)) != 1:
        raise ValueError("exactly one of `prompt`, `messages` or `segments` must be given")
    if segments is None and (recompute_ratio is not None or blend is not None):
        raise ValueError("`recompute_ratio` and `blend` apply only to `segments`")
    request = pb.GenerateRequest(model=model or "", request_id=request_id or "")
    if prompt is not None:
        _prompt_field(request, prompt)
    elif messages is not None:
        _messages_field(request, messages)
    elif segments is not None:
        _segments_field(request, segments, recompute_ratio, blend)
    sampling = request.sampling
    # proto3 `optional`: set explicitly so the server sees the client's values, not its defaults
    if max_tokens is not None:  # unset: the server's default, clamped to the context left
        sampling.max_tokens = max_tokens
    sampling.temperature = temperature
    sampling.top_p = top_p
    sampling.top_k = top_k
    if seed is not None:
        sampling.seed = seed
    sampling.stop.extend([stop] if isinstance(stop, str) else (stop or []))
    sampling.ignore_eos = ignore_eos
    if cache_salt is not None:
        if not isinstance(cache_salt, str) or not cache_salt:
            raise ValueError("cache_salt must be a non-empty string")
        sampling.cache_salt = cache_salt
    if options is not None:
        options.apply(sampling)
    return request


@dataclass(frozen=True)
class SamplingExtras:
    """The less common sampling options of generate()/stream(); None = the server's default.

    n: choices to generate (choice i samples with seed + i); min_tokens: no EOS or stop token
    before that many tokens; stop_token_ids: token ids that end a choice; logprobs: N most
    likely alternatives per token, with each token's raw logprob; prompt_logprobs: the same
    for the prompt's tokens; presence/frequency_penalty in [-2, 2] and repetition_penalty in
    (0, 2], applied as vLLM does.
    """

    n: int | None = None
    min_tokens: int | None = None
    stop_token_ids: Sequence[int] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None

    def apply(self, sampling: pb.SamplingOptions) -> None:
        for name in ("n", "min_tokens", "logprobs", "prompt_logprobs", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                try:
                    setattr(sampling, name, value)
                except (TypeError, ValueError):
                    raise ValueError(f"{name}: {value!r} is out of range") from None
        sampling.stop_token_ids.extend(self.stop_token_ids or ())

    @property
    def num_choices(self) -> int:
        return self.n or 1


def tokenize_request(text: str, add_special_tokens: bool, model: str | None) -> pb.TokenizeRequest:
    """Build a TokenizeRequest."""
    return pb.TokenizeRequest(model=model or "", text=text, add_special_tokens=add_special_tokens)


def resolve_timeout(timeout: float | None, default: float | None) -> float | None:
    """The per-call deadline in seconds, falling back to the client's default."""
    return default if timeout is None else timeout
