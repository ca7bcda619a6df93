"""Per-request generation settings, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

GREEDY_TEMPERATURE = 1e-5  # below this, sampling is greedy (dividing by it would overflow)
MAX_LOGPROBS = 20  # most top alternatives returned per token (vLLM's default cap)
MAX_STOP_STRINGS = 16  # each is searched every step: bounded work per request
MAX_STOP_LENGTH = 256
MAX_CACHE_SALT_LENGTH = 256


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    `temperature` below 1e-5 is greedy; `top_k=0` (or any value at or above the vocabulary size)
    disables top-k. Each draw is a pure function of (`seed`, output position), so a seeded
    request repeats exactly whatever it is batched with, on CPU and CUDA, after a handoff or a
    recomputation. `min_tokens` keeps EOS and `stop_token_ids` from being sampled before that
    many tokens. `logprobs=N` returns, per token, the raw log-probability (log-softmax of the
    logits, before temperature) of the sampled token and of the N most likely ones.
    `cache_salt` isolates the request's cached KV: it shares prefix and chunk caches only with
    requests of the same salt (as vLLM's), so tenants cannot probe each other's prompts.
    Penalties act on the logits as vLLM's do, before temperature, top-k and top-p (and before
    the greedy choice): `repetition_penalty` r divides a positive logit by r and multiplies a
    negative one by r for every token seen in the prompt or the output (r > 1 discourages
    repeats); `frequency_penalty` f subtracts f times a token's count in the output and
    `presence_penalty` p subtracts p once from every token the output already holds. Returned
    logprobs stay those of the unpenalized logits.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    cache_salt: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Output position of the first draw: a request resumed after n tokens (their ids now end
    # its prompt) continues the same sequence of draws, so a seeded request repeats exactly.
    draw_offset: int = 0

    def after(self, num_generated: int) -> SamplingParams:
        """These settings for the rest of a request that has generated `num_generated` tokens
        (which become part of its prompt)."""
        return replace(self, max_tokens=self.max_tokens - num_generated,
                       min_tokens=max(0, self.min_tokens - num_generated),
                       draw_offset=self.draw_offset + num_generated)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", [self.stop])
        _check(_is_int(self.max_tokens) and self.max_tokens > 0,
               "max_tokens", self.max_tokens, "must be an integer > 0")
        _check(isinstance(self.temperature, int | float) and not isinstance(self.temperature, bool)
               and math.isfinite(self.temperature) and self.temperature >= 0,
               "temperature", self.temperature, "must be a finite number >= 0")
        _check(isinstance(self.top_p, int | float) and not isinstance(self.top_p, bool)
               and 0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _check(_is_int(self.top_k) and self.top_k >= 0,
               "top_k", self.top_k, "must be an integer >= 0 (0 disables top-k)")
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "must be an integer")
        _check(self.stop is None or (isinstance(self.stop, list | tuple) and all(
            isinstance(s, str) and s for s in self.stop)),
            "stop", self.stop, "must be a list of non-empty strings")
        if self.stop is not None:
            _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"<{len(self.stop)} strings>",
                   f"must hold at most {MAX_STOP_STRINGS} strings")
            longest = max(map(len, self.stop), default=0)
            _check(longest <= MAX_STOP_LENGTH, "stop", f"<a string of {longest} characters>",
                   f"strings must be at most {MAX_STOP_LENGTH} characters")
        _check(self.stop_token_ids is None or (isinstance(self.stop_token_ids, list | tuple)
               and all(_is_int(t) and t >= 0 for t in self.stop_token_ids)),
               "stop_token_ids", self.stop_token_ids, "must be a list of token ids >= 0")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens", self.min_tokens, "must be an integer in [0, max_tokens]")
        _check(self.logprobs is None or (_is_int(self.logprobs)
                                         and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", self.logprobs, f"must be an integer in [0, {MAX_LOGPROBS}]")
        _check(self.cache_salt is None or (isinstance(self.cache_salt, str) and 0 < len(
            self.cache_salt) <= MAX_CACHE_SALT_LENGTH), "cache_salt",
            self.cache_salt if not isinstance(self.cache_salt, str)
            or len(self.cache_salt) <= 64 else f"<{len(self.cache_salt)} characters>",
            f"must be a non-empty string of at most {MAX_CACHE_SALT_LENGTH} characters")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2 <= value <= 2, name, value, "must be in [-2, 2]")
        _check(_is_number(self.repetition_penalty) and 0 < self.repetition_penalty <= 2,
               "repetition_penalty", self.repetition_penalty, "must be in (0, 2]")

        _check(_is_int(self.draw_offset) and self.draw_offset >= 0, "draw_offset",
               self.draw_offset, "must be an integer >= 0")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Whether any penalty changes the logits (the neutral values leave them exact)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    """A finite int or float, not a bool. An int is finite however large (math.isfinite would
    raise OverflowError on one past the float range, instead of the ValueError callers expect)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and (
        isinstance(x, int) or math.isfinite(x))


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} {rule}")
