"""Errors the router raises (the gateway maps each to one status code), and `translate`, which
maps worker and Ray errors to them."""

from __future__ import annotations

import asyncio
import re

from ray.exceptions import GetTimeoutError, RayActorError, RaySystemError

from tandem.prefill_worker.worker import RequestAborted
from tandem.transfer.errors import TransferCorrupted, TransferError, TransferUnavailable

_PARAM = re.compile(r"([A-Za-z_][\w.\[\]]*)(?::|=| must| is)")


class ClusterError(Exception):
    """A request could not be served."""


class InvalidRequest(ClusterError, ValueError):
    """Bad input; the message starts with the field it names (INVALID_ARGUMENT)."""

    @property
    def param(self) -> str | None:
        """The field the message names ("max_tokens: ..." or "top_p=2 must ..."), if any."""
        match = _PARAM.match(str(self))
        return match.group(1) if match else None


class UnknownModel(InvalidRequest):
    """The request names a model this gateway does not serve (HTTP 404)."""


class PermissionDenied(ClusterError):
    """The caller's key may not do this, e.g. abort another key's request."""


class Overloaded(ClusterError):
    """The admission queue is full (RESOURCE_EXHAUSTED); retry later."""


class WorkerUnavailable(ClusterError):
    """A worker died or did not answer in time (UNAVAILABLE)."""


class HandoffFailed(ClusterError):
    """The KV handoff failed; `corrupted` when a checksum caught damaged data (DATA_LOSS)."""

    def __init__(self, message: str, corrupted: bool = False) -> None:
        super().__init__(message)
        self.corrupted = corrupted


class WorkerFailed(ClusterError):
    """A worker failed while computing the request (INTERNAL)."""

def translate(error: BaseException) -> BaseException:
    """Map worker and Ray errors to the cluster's errors (the gateway maps those to codes)."""
    if isinstance(error, InvalidRequest | Overloaded | WorkerUnavailable | HandoffFailed
                  | WorkerFailed | asyncio.CancelledError):
        return error
    if isinstance(error, TransferCorrupted):
        return HandoffFailed(message_of(error), corrupted=True)
    if isinstance(error, TransferUnavailable):
        return WorkerUnavailable(f"the decode worker is unreachable: {message_of(error)}")
    if isinstance(error, TransferError):
        return HandoffFailed(message_of(error))
    if isinstance(error, RequestAborted):
        return WorkerFailed(message_of(error))
    if isinstance(error, ValueError):
        return InvalidRequest(message_of(error))
    if isinstance(error, RayActorError | RaySystemError | GetTimeoutError | TimeoutError):
        return WorkerUnavailable(f"a worker is unavailable: {message_of(error)}")
    return WorkerFailed(message_of(error))


def message_of(error: BaseException) -> str:
    """The original message of an error raised in a worker, without Ray's traceback."""
    cause = getattr(error, "cause", None) or error
    return str(cause) or type(cause).__name__
