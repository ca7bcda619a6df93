"""What each stored object is worth keeping, for eviction by value in the local tiers:
reuse frequency x compute saved / bytes (`engine.chunk_cache.chunk_value`). A chunk variant's
saving is its tokens less the share its dependence says a blend recomputes; a prefix chunk's
is all its tokens. Redis is left to its own LRU."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from tandem.engine.chunk_cache import chunk_value

MAX_TRACKED = 1 << 16  # keys with counts; past this the oldest are forgotten (value 0 + LRU)


@dataclass
class _Use:
    num_tokens: int
    dependence: float | None
    hits: int = 0


class KeyValues:
    def __init__(self) -> None:
        self._uses: OrderedDict[str, _Use] = OrderedDict()
        self._lock = threading.Lock()

    def stored(self, key: str, num_tokens: int, dependence: float | None) -> None:
        with self._lock:
            old = self._uses.pop(key, None)
            self._uses[key] = _Use(num_tokens, dependence, old.hits if old else 0)
            while len(self._uses) > MAX_TRACKED:
                self._uses.popitem(last=False)

    def hit(self, key: str) -> None:
        with self._lock:
            use = self._uses.get(key)
            if use is not None:
                use.hits += 1
                self._uses.move_to_end(key)

    def value(self, key: str, num_bytes: int) -> float:
        """Unknown keys (stored before this process started) are worth 0: evicted first."""
        with self._lock:
            use = self._uses.get(key)
        if use is None:
            return 0.0
        return chunk_value(use.hits, use.num_tokens, use.dependence, num_bytes)
