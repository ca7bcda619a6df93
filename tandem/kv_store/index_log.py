"""`IndexLog`: which keys a worker's local tiers hold, as versioned changes for the router."""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass

MAX_CHANGES = 20_000


@dataclass(frozen=True)
class IndexDelta:
    version: int
    added: list[str]
    removed: list[str]
    full: bool  # `added` is the whole index: forget what you had


class IndexLog:
    """Counts the local tiers holding each key; a key enters the index with its first copy and
    leaves with its last."""

    def __init__(self) -> None:
        self.version = 0
        self._copies: Counter[str] = Counter()
        self._changes: deque[tuple[int, bool, str]] = deque(maxlen=MAX_CHANGES)
        self._lock = threading.Lock()

    def added(self, key: str) -> None:
        with self._lock:
            self._copies[key] += 1
            if self._copies[key] == 1:
                self._record(True, key)

    def removed(self, key: str) -> None:
        with self._lock:
            if self._copies[key] <= 1:
                self._copies.pop(key, None)
                self._record(False, key)
            else:
                self._copies[key] -= 1

    def _record(self, added: bool, key: str) -> None:
        self.version += 1
        self._changes.append((self.version, added, key))

    def changes_since(self, version: int) -> IndexDelta:
        with self._lock:
            oldest = self._changes[0][0] if self._changes else self.version + 1
            if version > self.version or version + 1 < oldest:
                return IndexDelta(self.version, list(self._copies), [], full=True)
            last: dict[str, bool] = {}  # a key's latest change wins
            for v, was_added, key in self._changes:
                if v > version:
                    last[key] = was_added
            return IndexDelta(self.version, [k for k, a in last.items() if a],
                              [k for k, a in last.items() if not a], full=False)
