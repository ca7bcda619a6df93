"""The operator's boundary errors, as kopf tells them apart: a temporary failure is retried
after a delay (the API server or the gateway is briefly unreachable), a permanent one (a spec
the server cannot run) is written to the TandemCluster's status and not retried until the spec
changes."""

from __future__ import annotations

import kopf


class OperatorError(Exception):
    """Base of the operator's own failures."""


class SpecInvalid(OperatorError):
    """The spec passed the CRD's schema but cannot be served (e.g. min above max)."""


def permanent(e: Exception) -> kopf.PermanentError:
    return kopf.PermanentError(str(e))


def temporary(e: Exception, delay_s: float = 10.0) -> kopf.TemporaryError:
    return kopf.TemporaryError(str(e), delay=delay_s)
