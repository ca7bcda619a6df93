"""Errors about stored or transferred KV objects."""


class KVObjectError(Exception):
    """A KV object cannot be used: treat it as a cache miss or fail the transfer."""


class KVFormatError(KVObjectError):
    """The header is malformed, of an unknown version, or for another model or layout."""


class KVChecksumError(KVObjectError):
    """The payload does not match the checksum in its header: it was corrupted."""
