"""Content keys of stored KV chunks, namespaced by model fingerprint and `KVSpec`.

- A prefix chunk's key chains the hashes of every chunk before it, so equal keys mean equal
  prefixes (the KV of a token depends on all tokens before it).
- A position-independent chunk's key hashes only its own tokens (its KV computed from position
  0, for blending wherever it lands).
Keys are BLAKE2b-128 digests in hex: `tdkv:<namespace>:p:<hash>` and `tdkv:<namespace>:c:<hash>`.
A request's `cache_salt` gives it a namespace of its own (`salted`): salted requests share KV
only with requests of the same salt.
"""

from __future__ import annotations

import hashlib

import numpy as np

from tandem.engine.kv_cache import KVSpec


def _digest(*parts: bytes) -> bytes:
    return hashlib.blake2b(b"".join(parts), digest_size=16).digest()


def _token_bytes(tokens: list[int]) -> bytes:
    return np.asarray(tokens, dtype=np.int64).tobytes()


def namespace(fingerprint: str, spec: KVSpec) -> str:
    """What KV must agree on to be shared: the model and the cache layout."""
    return _digest(fingerprint.encode(), spec.model_dump_json().encode()).hex()[:16]


def salted(ns: str, salt: str | None) -> str:
    """The namespace of requests with `salt` (`ns` itself without one)."""
    # Only [0-9a-z:] in keys: they name files in the SSD tier.
    return ns if salt is None else f"{ns}s{_digest(b'salt:', salt.encode()).hex()[:16]}"


def prefix_keys(ns: str, tokens: list[int], chunk_tokens: int) -> list[str]:
    """Keys of the whole `chunk_tokens`-token chunks of `tokens`, each chained to its prefix."""
    keys, prev = [], b""
    for start in range(0, len(tokens) - chunk_tokens + 1, chunk_tokens):
        prev = _digest(prev, _token_bytes(tokens[start:start + chunk_tokens]))
        keys.append(f"tdkv:{ns}:p:{prev.hex()}")
    return keys


def chunk_key(ns: str, tokens: list[int]) -> str:
    """Key of a chunk's own KV computed from position 0, wherever it appears."""
    return f"tdkv:{ns}:c:{_digest(_token_bytes(tokens)).hex()}"
