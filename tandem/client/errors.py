"""The one exception type the client SDK raises for failed RPCs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc


class TandemError(Exception):
    """A failed call to a Tandem gateway: a gRPC status code plus the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        """The gRPC status code, e.g. `grpc.StatusCode.INVALID_ARGUMENT`."""
        return self._code

    def details(self) -> str:
        """The server's error message."""
        return self._details

    def __str__(self) -> str:
        return self._details

    def __repr__(self) -> str:
        return f"TandemError({self._code.name}, {self._details!r})"

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> TandemError:
        """Wrap a `grpc.RpcError` (sync or asyncio) raised by a call."""
        code = err.code() if callable(getattr(err, "code", None)) else None
        details = err.details() if callable(getattr(err, "details", None)) else None
        return cls(code or grpc.StatusCode.UNKNOWN, details or str(err))


def missing_finish_reason() -> TandemError:
    """The error for a Generate stream that ended before its final message."""
    return TandemError(grpc.StatusCode.INTERNAL, "stream ended without a finish_reason")


@contextmanager
def rpc_errors() -> Iterator[None]:
    """Re-raise any `grpc.RpcError` inside the block as a `TandemError`."""
    try:
        yield
    except grpc.RpcError as err:
        raise TandemError.from_rpc_error(err) from err
