"""Errors about stored or transferred KV objects, and about the tiers that hold them."""


class KVObjectError(Exception):
    """A KV object cannot be used: treat it as a cache miss or fail the transfer."""


class KVFormatError(KVObjectError):
    """The header is malformed, of an unknown version, or for another model or layout."""


class KVChecksumError(KVObjectError):
    """The payload does not match the checksum in its header: it was corrupted."""


class TierError(Exception):
    """A tier could not serve a call: the store skips the tier, it never fails a request."""


class TierUnavailable(TierError):
    """The tier cannot be reached (down, slow, refused our credentials): skip it and retry it
    later with backoff."""


class TierFull(TierError):
    """The tier's medium has no space left (e.g. the SSD): stop writing to it for a while."""
