"""The gRPC backend: requests through the Tandem SDK's `AsyncClient.stream`.

A chunk carrying token ids is a token event (TTFT ends at the first, TPOT spans first to last);
the final chunk's usage gives the token counts and its timings the gateway's own view, which
`bench/serve.py` reports next to the client's. A failed call is recorded under its gRPC status
name (e.g. "UNAVAILABLE", "DEADLINE_EXCEEDED").
"""

from __future__ import annotations

import time
from types import TracebackType

from tandem.client import AsyncClient, TandemError
from tandem.loadgen.backend import RequestResult, ServedModel
from tandem.loadgen.workload import Request

LIST_MODELS_TIMEOUT_S = 30.0


class GrpcBackend:
    """Sends to a gateway's gRPC API at `address` ("host:port")."""

    name = "grpc"

    def __init__(
        self,
        address: str,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        model: str | None = None,
    ) -> None:
        self.address = address
        self.model = model  # None: the gateway's default; only a chosen model is sent
        self._client = AsyncClient(address, tls=tls, root_certificates=root_certificates,
                                   api_key=api_key, timeout=timeout)

    async def served_model(self) -> ServedModel:
        models = await self._client.list_models(timeout=LIST_MODELS_TIMEOUT_S)
        if not models:
            raise RuntimeError(f"the gateway at {self.address} lists no model")
        match = [m for m in models if self.model is None or m.id == self.model]
        if not match:
            raise RuntimeError(f"the gateway serves {', '.join(m.id for m in models)}, "
                               f"not {self.model}")
        return ServedModel(match[0].id, match[0].max_model_len or None)

    async def send(self, request: Request) -> RequestResult:
        result = RequestResult(request.max_tokens, prompt_tokens=len(request.prompt))
        result.send = time.perf_counter()
        try:
            async for chunk in self._client.stream(
                    request.prompt, max_tokens=request.max_tokens, temperature=0.0,
                    ignore_eos=True, model=self.model):
                now = time.perf_counter()
                if chunk.token_ids:
                    if result.first is None:
                        result.first = now
                    result.last = now
                    result.completion_tokens += len(chunk.token_ids)
                if chunk.finish_reason is not None:
                    result.finish_reason = chunk.finish_reason
                if chunk.usage is not None:
                    result.prompt_tokens = chunk.usage.prompt_tokens
                    result.completion_tokens = chunk.usage.completion_tokens
                if chunk.timings is not None:
                    result.timings = chunk.timings
        except TandemError as e:
            result.fail(e.code().name, e.details())
        except Exception as e:  # a benchmark reports a broken request instead of crashing
            result.fail(type(e).__name__, str(e))
        result.end = time.perf_counter()
        return result

    async def aclose(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> GrpcBackend:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()
