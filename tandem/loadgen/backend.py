"""What a backend is (a way to send one request and time it) and what it records per request.

A backend streams one request and fills a `RequestResult` with client-side timestamps; it never
raises for a failed request, it records an error code instead, so one broken request cannot end
a benchmark. Two exist: `GrpcBackend` (the Tandem SDK) and `HttpBackend` (OpenAI-compatible
`/v1/completions`); both time the same events, so their numbers compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tandem.client import Timings
    from tandem.loadgen.workload import Request


@dataclass(frozen=True)
class ServedModel:
    """The model a backend's server serves."""

    id: str
    max_model_len: int | None  # None where the server does not say


@dataclass
class RequestResult:
    """What the client saw of one request; times are `time.perf_counter()` values."""

    expected_tokens: int  # the request's max_tokens, which ignore_eos makes exact
    prompt_tokens: int = 0  # from the server's usage; the prompt's length until then
    send: float = 0.0
    end: float = 0.0
    first: float | None = None  # the first event carrying a token
    last: float | None = None  # the last event carrying a token
    completion_tokens: int = 0  # from the server's usage (token events counted otherwise)
    finish_reason: str | None = None  # "length" for a request that ran to its max_tokens
    timings: Timings | None = None  # the gateway's own timings (gRPC only)
    error_code: str | None = None  # e.g. "UNAVAILABLE" (gRPC), "HTTP 429", "ReadTimeout"
    error: str | None = None  # the message that came with it

    @property
    def ok(self) -> bool:
        return self.error_code is None

    @property
    def ttft_s(self) -> float | None:
        """Send to the first token, or None when no token came."""
        return None if self.first is None else self.first - self.send

    @property
    def tpot_s(self) -> float | None:
        """Mean gap between tokens after the first; None with fewer than two tokens."""
        if self.first is None or self.last is None or self.completion_tokens < 2:
            return None
        return (self.last - self.first) / (self.completion_tokens - 1)

    @property
    def e2e_s(self) -> float:
        return self.end - self.send

    def fail(self, code: str, message: str) -> None:
        self.error_code, self.error = code, message


class Backend(Protocol):
    """Sends requests to one server; close it with aclose() (each one is also `async with`)."""

    name: str  # "grpc" or "http"

    async def served_model(self) -> ServedModel:
        """The served model; later requests name it."""
        ...

    async def send(self, request: Request) -> RequestResult:
        """Stream one request; failures are recorded in the result, never raised."""
        ...

    async def aclose(self) -> None:
        ...
