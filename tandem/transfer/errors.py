"""Errors of a KV handoff, split by what the sender should do next."""


class TransferError(Exception):
    """A KV handoff failed."""

    retryable: bool = False


class TransferUnavailable(TransferError):
    """The receiver could not be reached or timed out: the handoff may be retried."""

    retryable = True


class TransferRejected(TransferError):
    """The receiver refused the KV (corrupt, wrong model or layout, unknown request): fatal."""


class TransferCorrupted(TransferRejected):
    """The receiver's checksum caught KV damaged in transit."""
