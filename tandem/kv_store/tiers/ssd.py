"""`SsdTier`: one file per object under a directory, written atomically (temp file + rename).

Objects already in the directory when the tier opens are kept (oldest first in LRU order), so
a restarted worker finds its cache again; a torn or damaged file is caught by its checksum.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import uuid
from pathlib import Path

from tandem.kv_store.errors import TierFull, TierUnavailable
from tandem.kv_store.tiers.base import Buffer, LocalTier

logger = logging.getLogger(__name__)

SUFFIX = ".kv"
_KEY_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyz:")


class SsdTier(LocalTier):
    def __init__(self, directory: Path, capacity_bytes: int, name: str = "ssd") -> None:
        super().__init__(name, capacity_bytes)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # One process per directory: another's index would not see our files, nor we its.
        self._lock = open(self.directory / ".lock", "a+b")  # noqa: SIM115 (held while open)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise TierUnavailable(f"ssd tier: {self.directory} is in use by another process; "
                                  "give each cluster its own kv_store.ssd_dir") from None
        self._reopen()

    def _reopen(self) -> None:
        found = []
        for path in self.directory.iterdir():
            if path.name.startswith(".tmp-"):  # a write that never finished
                path.unlink(missing_ok=True)
            elif path.suffix == SUFFIX:
                stat = path.stat()
                found.append((stat.st_mtime, path.stem.replace('_', ':'), stat.st_size))
        for _, key, size in sorted(found):
            self._index.add(key, size)
        if found:
            logger.info("ssd tier: %d objects (%.1f MB) already in %s", len(found),
                        self._index.used_bytes / 1e6, self.directory)

    def _path(self, key: str) -> Path:
        if not _KEY_CHARS.issuperset(key):
            raise ValueError(f"ssd tier: key {key!r} has characters other than [0-9a-z:]")
        return self.directory / f"{key.replace(':', '_')}{SUFFIX}"

    def get(self, key: str) -> Buffer | None:
        if not self._index.touch(key):
            return None
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:  # removed meanwhile (or by hand): the store forgets it
            return None
        except OSError as e:
            raise TierUnavailable(f"ssd tier: cannot read {self._path(key)}: {e}") from None

    def get_range(self, key: str, offset: int, length: int) -> Buffer | None:
        if not self._index.touch(key):
            return None
        try:
            with open(self._path(key), "rb") as f:
                f.seek(offset)
                return f.read(length)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TierUnavailable(f"ssd tier: cannot read {self._path(key)}: {e}") from None

    def put(self, key: str, data: Buffer) -> None:
        tmp = self.directory / f".tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self._path(key))
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TierFull(f"ssd tier: {self.directory} is full ({e.strerror})") from None
            raise TierUnavailable(f"ssd tier: cannot write to {self.directory}: {e}") from None
        self._index.add(key, len(data))

    def remove(self, key: str) -> bool:
        removed = self._index.discard(key)
        self._path(key).unlink(missing_ok=True)
        return removed

    def close(self) -> None:
        self._lock.close()  # releases the flock

