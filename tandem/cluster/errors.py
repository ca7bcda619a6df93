"""Errors the router raises; the gateway maps each to one gRPC status code."""


class ClusterError(Exception):
    """A request could not be served."""


class InvalidRequest(ClusterError, ValueError):
    """Bad input; the message names the field (INVALID_ARGUMENT)."""


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
