"""The model fingerprint: which weights computed a KV cache, from their content.

Stored KV outlives the process (the SSD tier, Redis), so the fingerprint in its key and header
must change whenever the weights do, including when files are replaced in place under the same
name and size. It hashes the checkpoint's bytes (the GGUF file; every safetensors file and
config.json of an HF directory) with XXH3-128. Hashing 16 GB takes seconds, so digests are
cached per file by path, size and modification time (`~/.cache/tandem/fingerprints.json`,
`TANDEM_CACHE_DIR` to move it): a restart of an unchanged checkpoint reads no weight twice.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import xxhash

logger = logging.getLogger(__name__)

READ_BYTES = 16 << 20


def cache_file() -> Path:
    root = os.environ.get("TANDEM_CACHE_DIR") or Path.home() / ".cache" / "tandem"
    return Path(root) / "fingerprints.json"


def checkpoint_files(path: Path) -> list[Path]:
    """The files whose bytes define the model's weights."""
    if path.is_file():
        return [path]
    return sorted([*path.glob("*.safetensors"), path / "config.json"])


def file_digest(file: Path, cache: dict[str, dict]) -> str:
    """XXH3-128 of `file`, from `cache` when its size and mtime are unchanged."""
    stat = file.stat()
    key, stamp = str(file.resolve()), [stat.st_size, stat.st_mtime_ns]
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return str(entry["digest"])
    digest = xxhash.xxh3_128()
    with file.open("rb") as f:
        while block := f.read(READ_BYTES):
            digest.update(block)
    cache[key] = {"stamp": stamp, "digest": digest.hexdigest()}
    return cache[key]["digest"]


def content_fingerprint(path: Path, label: str) -> str:
    """`label` plus a digest over the checkpoint's files (their names and contents)."""
    store = cache_file()
    try:
        cache = json.loads(store.read_text())
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    before = dict(cache)
    combined = xxhash.xxh3_128()
    for file in checkpoint_files(path):
        combined.update(f"{file.name}:{file_digest(file, cache)};".encode())
    if cache != before:
        _save(store, cache)
    return f"{label}:{combined.hexdigest()[:24]}"


def _save(store: Path, cache: dict) -> None:
    """Write the cache atomically; a read-only home only costs hashing again next time."""
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=store.parent, delete=False) as tmp:
            json.dump(cache, tmp)
        os.replace(tmp.name, store)
    except OSError as e:
        logger.info("could not cache model digests in %s: %s", store, e)
