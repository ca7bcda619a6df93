"""The tiered store's write side, on its writer thread: a put lands in the first local tier
and through to every shared tier; a local tier over capacity demotes its least recently used
objects to the next local tier (the last one drops them); a hit in a lower tier is promoted.

`TierSet` is what both sides of the store share: the tiers in read order, their health, codecs
and counters, and the index of what the local tiers hold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tandem.engine.kv_cache import KVBlocks, KVSpec
from tandem.kv_store.codec import Codec
from tandem.kv_store.errors import TierError
from tandem.kv_store.health import TierHealth
from tandem.kv_store.index_log import IndexLog
from tandem.kv_store.kv_object import decode_object, encode_object, read_header
from tandem.kv_store.stats import TierStats
from tandem.kv_store.tiers.base import Tier
from tandem.kv_store.values import KeyValues

HEADER_READ_BYTES = 8192  # a first ranged read that holds the header of any stored object


@dataclass
class TierSet:
    local: list[Tier]  # fastest first: the demotion chain
    tiers: list[Tier]  # read order: the local ones, then the shared ones
    health: dict[str, TierHealth]
    codecs: dict[str, Codec]
    stats: dict[str, TierStats]
    index: IndexLog
    values: KeyValues  # eviction by value in the local tiers
    fingerprint: str
    spec: KVSpec

    def remove(self, tier: Tier, key: str) -> None:
        try:
            removed = tier.remove(key)
        except TierError as e:
            self.health[tier.name].failed(e)
            return
        if removed and not tier.shared:
            self.index.removed(key)


class StoreWriter:
    def __init__(self, tiers: TierSet) -> None:
        self.t = tiers
        self.puts = 0

    def write(self, item: tuple[str, str, tuple[KVBlocks, int, float | None] | bytes]) -> None:
        """One queued write: ("put", key, (kv, first_position, dependence)) or ("promote", key,
        bytes)."""
        kind, key, value = item
        if kind == "put":
            self._store(key, *value)
        else:  # a promotion: the object's bytes, into the first local tier
            self._put_local(0, key, value)

    def _store(self, key: str, kv: KVBlocks, first_position: int,
               dependence: float | None = None) -> None:
        self.puts += 1
        encoded: dict[str, bytes] = {}

        def blob_for(tier: Tier) -> bytes:
            codec = self.t.codecs[tier.name]
            if codec.name not in encoded:
                encoded[codec.name] = encode_object(kv, self.t.fingerprint, codec,
                                                    first_position, dependence)
            return encoded[codec.name]

        if self.t.local:
            self._put_local(0, key, blob_for(self.t.local[0]))
        for tier in self.t.tiers[len(self.t.local):]:
            self._put(tier, key, blob_for)

    def _put_local(self, i: int, key: str, blob: bytes) -> None:
        """Put into local tier `i`, demoting its LRU objects down the chain to make room."""
        if i >= len(self.t.local):
            return
        tier = self.t.local[i]
        if tier.contains(key):
            return
        blob = self._transcode(blob, tier)
        if not self.t.health[tier.name].writable() or len(blob) > tier.capacity_bytes:
            self._put_local(i + 1, key, blob)
            return
        for victim in tier.victims(len(blob), self.t.values.value):
            try:
                demoted = tier.get(victim) if i + 1 < len(self.t.local) else None
            except TierError:
                demoted = None
            self.t.remove(tier, victim)
            self.t.stats[tier.name].evictions += 1
            if demoted is not None:
                self._put_local(i + 1, victim, bytes(demoted))
        if not self._put(tier, key, lambda _: blob):
            self._put_local(i + 1, key, blob)

    def _put(self, tier: Tier, key: str, blob_for: Callable[[Tier], bytes]) -> bool:
        health = self.t.health[tier.name]
        try:
            if not health.writable() or (tier.shared and tier.contains(key)):
                return False
            blob = blob_for(tier)
            tier.put(key, blob)
        except TierError as e:
            health.failed(e)
            return False
        self.t.stats[tier.name].bytes_written += len(blob)
        if not tier.shared:
            self.t.index.added(key)
        return True

    def _transcode(self, blob: bytes, tier: Tier) -> bytes:
        """`blob` in `tier`'s codec (demotion between tiers that code differently)."""
        codec = self.t.codecs[tier.name]
        header = read_header(memoryview(blob)[:HEADER_READ_BYTES], self.t.fingerprint,
                             self.t.spec)
        if header.codec == codec.name:
            return blob
        return encode_object(decode_object(blob, self.t.fingerprint, self.t.spec),
                             self.t.fingerprint, codec, header.first_position,
                             header.dependence)
