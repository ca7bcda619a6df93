"""The public gRPC service (`tandem.v1.Tandem`): the `Frontend` behind gRPC status codes.

It checks the caller's API key, rejects unparsable messages, applies the client's deadline and
maps cluster errors to status codes here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from tandem.cluster.auth import ApiKeys
from tandem.cluster.errors import (
    ClusterError,
    HandoffFailed,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    WorkerUnavailable,
)
from tandem.cluster.frontend import Frontend
from tandem.cluster.wire import reject_unparsable
from tandem.proto.v1 import tandem_pb2 as pb
from tandem.proto.v1 import tandem_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

# gRPC metadata that pins a request to one prefill worker (by index): honoured only with
# `debug_routing`, for tests and debugging.
PREFILL_WORKER_KEY = "x-tandem-prefill-worker"


def status_of(error: ClusterError) -> grpc.StatusCode:
    if isinstance(error, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, WorkerUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(error, HandoffFailed) and error.corrupted:
        return grpc.StatusCode.DATA_LOSS
    return grpc.StatusCode.INTERNAL


class Gateway(pb_grpc.TandemServicer):
    def __init__(self, frontend: Frontend, keys: ApiKeys) -> None:
        self.frontend, self.keys = frontend, keys

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) \
            -> AsyncIterator[pb.GenerateResponse]:
        caller = await self.keys.check(context)
        await reject_unparsable(request, context)
        try:
            prepared = await asyncio.to_thread(
                self.frontend.prepare, request, caller, context.time_remaining(),
                self._prefill_hint(context))
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:  # aclosing: a cancelled call (client gone) closes the router's streams at once
            async with contextlib.aclosing(self.frontend.stream(prepared)) as replies:
                async for reply in replies:
                    yield reply
        except TimeoutError as e:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except ClusterError as e:
            await context.abort(status_of(e), f"request {prepared.request_id}: {e}")

    def _prefill_hint(self, context: grpc.aio.ServicerContext) -> int | None:
        for key, value in context.invocation_metadata() or ():
            if key != PREFILL_WORKER_KEY:
                continue
            if not self.frontend.config.debug_routing:
                raise InvalidRequest(f"{PREFILL_WORKER_KEY}: routing hints are honoured only "
                                     "when the gateway runs with --debug-routing")
            try:
                return int(value)
            except ValueError:
                raise InvalidRequest(f"{PREFILL_WORKER_KEY}: {value!r} is not an integer") \
                    from None
        return None

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) \
            -> pb.TokenizeResponse:
        await self.keys.check(context)
        await reject_unparsable(request, context)
        try:
            self.frontend.check_model(request.model)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if not request.text:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text: is empty")
        ids = await asyncio.to_thread(self.frontend.tokenizer.encode, request.text,
                                      add_special_tokens=request.add_special_tokens)
        return pb.TokenizeResponse(token_ids=ids)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        await self.keys.check(context)
        await reject_unparsable(request, context)
        return pb.ListModelsResponse(models=[self.frontend.model])

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) \
            -> pb.AbortResponse:
        caller = await self.keys.check(context)
        await reject_unparsable(request, context)
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: is empty")
        try:
            found = await self.frontend.abort(request.request_id, caller)
        except ClusterError as e:
            await context.abort(status_of(e), str(e))
        return pb.AbortResponse(found=found)
