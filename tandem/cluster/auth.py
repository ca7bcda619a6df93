"""API keys: who may call the gateway's services, and whose request is whose.

Every call to a Tandem service carries `authorization: Bearer <key>` metadata when the gateway
has keys (`--api-key`, `TANDEM_API_KEY`); health checks and reflection stay open (they are other
services). A caller is known by a digest of its key, never the key itself, so request owners
can be kept and logged without holding secrets; keys are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac

import grpc

AUTHORIZATION = "authorization"


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def caller(self, metadata: tuple | None) -> str | None:
        """The digest of the caller's key (None when keys are off); raises PermissionError
        naming what is wrong with a missing or unknown key."""
        if not self._keys:
            return None
        values = [v for k, v in metadata or () if k == AUTHORIZATION]
        if not values:
            raise PermissionError("missing API key: send metadata 'authorization: Bearer <key>'")
        scheme, _, key = str(values[0]).partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise PermissionError("malformed authorization metadata: expected 'Bearer <key>'")
        given = key.strip().encode()
        if not any(hmac.compare_digest(given, k) for k in self._keys):
            raise PermissionError("invalid API key")
        return key_digest(key.strip())

    async def check(self, context: grpc.aio.ServicerContext) -> str | None:
        """`caller` for a call, aborting it with UNAUTHENTICATED when the key is not good."""
        try:
            return self.caller(context.invocation_metadata())
        except PermissionError as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
            raise  # not reached: abort raises
