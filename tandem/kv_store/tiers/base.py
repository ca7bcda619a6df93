"""The tier interface, and the LRU bookkeeping the local tiers share.

A tier stores opaque, already-encoded KV objects under string keys. It knows nothing of KV,
codecs or other tiers: the `TieredStore` walks the tiers in order, decides what to demote and
promote, and treats any `TierError` as "skip this tier". Calls may come from several threads.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable

Buffer = bytes | bytearray | memoryview
KeyValue = Callable[[str, int], float]  # (key, size in bytes) -> what keeping it is worth


class Tier(ABC):
    name: str
    capacity_bytes: int
    # Shared tiers (Redis) are seen by every worker: the store writes through to them and
    # leaves eviction to the tier itself; local tiers form the store's LRU demotion chain.
    shared: bool = False
    # Tiers in device memory hand objects out as tensors where they live (`get_tensor`), so a
    # hit reaches the KV pool with no copy through the host.
    holds_tensors: bool = False

    @abstractmethod
    def get(self, key: str) -> Buffer | None:
        """The object under `key` (marked recently used), or None."""

    def get_range(self, key: str, offset: int, length: int) -> Buffer | None:
        """`length` bytes of the object from `offset` (fewer at its end), or None."""
        data = self.get(key)
        return None if data is None else memoryview(data)[offset:offset + length]

    def get_tensor(self, key: str):  # -> torch.Tensor | None; tiers need not import torch
        """The object under `key` as a uint8 tensor where it lives (`holds_tensors` tiers)."""
        raise NotImplementedError(f"the {self.name} tier holds no tensors")

    @abstractmethod
    def contains(self, key: str) -> bool: ...

    @abstractmethod
    def put(self, key: str, data: Buffer) -> None:
        """Store `data` (the caller made room with `victims` first)."""

    @abstractmethod
    def remove(self, key: str) -> bool:
        """Delete the object; True if this call removed it (False: it was not there)."""

    def victims(self, num_bytes: int, value: KeyValue | None = None) -> list[str]:
        """Keys to remove so that `num_bytes` more fit ([] if they do): the least valuable
        first by `value(key, size)` (ties, or no `value`: the least recently used)."""
        return []

    def stored_keys(self) -> list[str]:
        """Keys this tier holds, least recently used first (local tiers only)."""
        return []

    def ping(self) -> None:
        """Raise TierUnavailable unless the tier answers."""
        return None

    @property
    def used_bytes(self) -> int:
        return 0

    def close(self) -> None:
        return None


class LruIndex:
    """Sizes of a local tier's objects in least-recently-used order (thread-safe)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def touch(self, key: str) -> bool:
        with self._lock:
            if key not in self._sizes:
                return False
            self._sizes.move_to_end(key)
            return True

    def add(self, key: str, size: int) -> None:
        with self._lock:
            self.used_bytes += size - self._sizes.pop(key, 0)
            self._sizes[key] = size

    def discard(self, key: str) -> bool:
        with self._lock:
            if key not in self._sizes:
                return False
            self.used_bytes -= self._sizes.pop(key)
            return True

    def victims(self, num_bytes: int, value: KeyValue | None = None) -> list[str]:
        with self._lock:
            excess, out = self.used_bytes + num_bytes - self.capacity_bytes, []
            if excess <= 0:
                return out
            order = list(self._sizes.items())  # least recently used first
            if value is not None:  # sorted is stable: LRU breaks ties
                order.sort(key=lambda item: value(*item))
            for key, size in order:
                if excess <= 0:
                    break
                out.append(key)
                excess -= size
            return out

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._sizes)


class LocalTier(Tier):
    """A tier on this worker's own memory or disk: it keeps its objects' sizes in LRU order."""

    def __init__(self, name: str, capacity_bytes: int) -> None:
        self.name, self.capacity_bytes = name, capacity_bytes
        self._index = LruIndex(capacity_bytes)

    def contains(self, key: str) -> bool:
        return key in self._index

    def victims(self, num_bytes: int, value: KeyValue | None = None) -> list[str]:
        return self._index.victims(num_bytes, value)

    def stored_keys(self) -> list[str]:
        return self._index.keys()

    @property
    def used_bytes(self) -> int:
        return self._index.used_bytes
