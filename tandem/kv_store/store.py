"""`TieredStore`: KV chunks across tiers, found by content key, written in the background.

Reads walk the tiers in order: the local ones (fastest first), then the shared ones. A hit in a
lower tier is promoted to the first (when `promote_on_hit`); a damaged object is a miss: it is
deleted and counted, never returned. Writes go on a queue that one writer thread drains, so a
request never waits for one (a full queue drops the write and counts it). A write lands in the
first local tier and through to every shared tier; a local tier over capacity demotes its least
recently used objects to the next local tier, and the last one drops them. A failing tier is
skipped (see `TierHealth`) and the request goes on with the others.
"""

from __future__ import annotations

import logging
import time

import torch

from tandem.engine.kv_cache import KVBlocks, KVSpec
from tandem.faults import Faults, active_faults
from tandem.kv_store import keys
from tandem.kv_store.codec import get_codec
from tandem.kv_store.codec.controller import TEXT, BandwidthMeter, StreamingController
from tandem.kv_store.errors import KVFormatError, KVObjectError, TierError
from tandem.kv_store.health import TierHealth
from tandem.kv_store.index_log import IndexLog
from tandem.kv_store.kv_object import (
    decode_layers,
    decode_object,
    decode_tensor,
    header_length,
    read_header,
)
from tandem.kv_store.stats import StoreStats, TierStats
from tandem.kv_store.store_writes import HEADER_READ_BYTES, StoreWriter, TierSet
from tandem.kv_store.tiers.base import Buffer, Tier
from tandem.kv_store.values import KeyValues
from tandem.kv_store.write_queue import WriteQueue

logger = logging.getLogger(__name__)

INITIAL_BANDWIDTH_BPS = 1e9  # a tier's read bandwidth before any read measured it


class TieredStore:
    def __init__(self, tiers: list[Tier], fingerprint: str, spec: KVSpec, *,
                 chunk_tokens: int = 256, codecs: dict[str, str] | None = None,
                 promote_on_hit: bool = True, max_pending_writes: int = 64) -> None:
        if len({t.name for t in tiers}) != len(tiers):
            raise ValueError("tier names must be unique")
        self.fingerprint, self.spec, self.chunk_tokens = fingerprint, spec, chunk_tokens
        self.namespace = keys.namespace(fingerprint, spec)
        local = [t for t in tiers if not t.shared]
        codec_of = {t.name: get_codec((codecs or {}).get(t.name, "raw")) for t in tiers}
        self.t = TierSet(
            local=local, tiers=local + [t for t in tiers if t.shared],
            health={t.name: TierHealth(t) for t in tiers}, codecs=codec_of,
            stats={t.name: TierStats(t.name, t.shared, codec_of[t.name].name,
                                     capacity_bytes=t.capacity_bytes) for t in tiers},
            index=IndexLog(), values=KeyValues(), fingerprint=fingerprint, spec=spec)
        self.local, self.tiers, self.health, self.codecs, self.index, self.values = (
            self.t.local, self.t.tiers, self.t.health, self.t.codecs, self.t.index,
            self.t.values)
        self._stats = self.t.stats
        self.promote_on_hit = promote_on_hit
        for tier in self.local:
            for key in tier.stored_keys():
                self.index.added(key)
        self.writer = StoreWriter(self.t)
        self._writes = WriteQueue(self.writer.write, max_pending_writes, "kv-store-writer")
        # What the streaming controller weighs: each tier's measured read bandwidth and the
        # size per token of what it stores.
        self.controller = StreamingController()
        self._bandwidth = {t.name: BandwidthMeter(INITIAL_BANDWIDTH_BPS) for t in tiers}
        self._bytes_per_token = {t.name: self.codecs[t.name].bytes_per_token(spec)
                                 for t in tiers}

    # -- reads (on the request path) -----------------------------------------------------------

    def prefix_keys(self, tokens: list[int], salt: str | None = None) -> list[str]:
        return keys.prefix_keys(keys.salted(self.namespace, salt), tokens, self.chunk_tokens)

    def load_prefix(self, tokens: list[int], timeout_s: float | None = None,
                    recompute_s_per_token: float | None = None,
                    salt: str | None = None) -> KVBlocks | None:
        """KV of the longest run of cached whole chunks that starts `tokens`, leaving at least
        one token to compute; None when the first chunk is not cached. Past `timeout_s` no
        further chunk is fetched, and with the prefill's `recompute_s_per_token` the
        controller stops at the first chunk that recomputing gets faster than loading."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        chunks = []
        for key in self.prefix_keys(tokens[:-1], salt):
            left = float("inf") if deadline is None else deadline - time.monotonic()
            if left <= 0:
                logger.info("KV lookup stopped after %d chunks: past its %.1f s budget",
                            len(chunks), timeout_s)
                break
            if recompute_s_per_token is not None and \
                    not self._worth_loading(key, left, recompute_s_per_token):
                break
            kv = self.get(key, num_tokens=self.chunk_tokens)
            if kv is None:
                break
            chunks.append(kv)
        if not chunks:
            return None
        data = chunks[0].data if len(chunks) == 1 else torch.cat([c.data for c in chunks], dim=2)
        return KVBlocks(self.spec, len(chunks) * self.chunk_tokens, data,
                        exact=all(c.exact for c in chunks))

    def _worth_loading(self, key: str, budget_s: float, recompute_s_per_token: float) -> bool:
        """The controller's call for the first tier holding `key`: load it, or recompute."""
        for tier in self.tiers:
            try:
                if not self.health[tier.name].usable() or not tier.contains(key):
                    continue
            except TierError as e:
                self.health[tier.name].failed(e)
                continue
            option = f"{tier.name}:{self.codecs[tier.name].name.rsplit(':', 1)[0]}"
            choice = self.controller.choose(
                {option: self._bytes_per_token[tier.name]}, self.chunk_tokens,
                self._bandwidth[tier.name].bps, budget_s, recompute_s_per_token)
            return choice.option != TEXT
        return True  # nowhere: the read will miss

    def contains(self, key: str) -> bool:
        """Whether a usable tier lists `key` (a read may still miss or find it damaged)."""
        for tier in self.tiers:
            health = self.health[tier.name]
            try:
                if health.usable() and tier.contains(key):
                    return True
            except TierError as e:
                health.failed(e)
        return False

    def get(self, key: str, num_tokens: int | None = None) -> KVBlocks | None:
        """The object under `key` from the first tier that has a sound copy (of `num_tokens`
        tokens, when given), or None."""
        def read(tier: Tier) -> Buffer | torch.Tensor | None:
            return tier.get_tensor(key) if tier.holds_tensors else tier.get(key)

        for tier, blob in self._find(key, read):
            try:
                kv = decode_tensor(blob, self.fingerprint, self.spec, num_tokens) \
                    if isinstance(blob, torch.Tensor) else \
                    decode_object(blob, self.fingerprint, self.spec, num_tokens)
            except KVObjectError as e:
                self._corrupt(tier, key, e)
                continue
            self._hit(tier, key, blob)
            per_token = self._bytes_per_token[tier.name]
            self._bytes_per_token[tier.name] = per_token + 0.3 * (
                len(blob) / kv.num_tokens - per_token)
            return kv
        return None

    def get_layers(self, key: str, layers: range, num_tokens: int | None = None) \
            -> torch.Tensor | None:
        """Only `layers` of the object under `key` (of `num_tokens` tokens, when given), by
        ranged reads; None when no tier has a sound copy."""
        for tier, head in self._find(key, lambda t: t.get_range(key, 0, HEADER_READ_BYTES)):
            try:
                size = header_length(head)
                if size > len(head):
                    head = tier.get_range(key, 0, size) or b""
                header = read_header(memoryview(head)[:size], self.fingerprint, self.spec)
                if num_tokens is not None and header.num_tokens != num_tokens:
                    raise KVFormatError(f"KV object holds {header.num_tokens} tokens, expected "
                                        f"{num_tokens}")
                offset, length = header.layer_span(layers)
                sections = tier.get_range(key, size + offset, length) or b""
                data = decode_layers(header, sections, layers)
            except KVObjectError as e:
                self._corrupt(tier, key, e)
                continue
            except TierError as e:
                self.health[tier.name].failed(e)
                continue
            if layers.start == 0:  # an object read layer by layer is one hit, not one a layer
                self._hit(tier, key, None)
            self._stats[tier.name].bytes_read += len(sections)
            return data
        return None

    def _find(self, key: str, read):
        """(tier, data) for each usable tier that returns data for `key`, in tier order."""
        for tier in self.tiers:
            health = self.health[tier.name]
            if not health.usable():
                continue
            started = time.perf_counter()
            try:
                inject_read_faults(tier.name)
                data = read(tier)
            except TierError as e:
                health.failed(e)
                continue
            if data is not None:
                self._bandwidth[tier.name].observe(len(data), time.perf_counter() - started)
            if data is None:
                self._stats[tier.name].misses += 1
                if not tier.shared and tier.contains(key):  # listed but gone: forget it
                    self.t.remove(tier, key)
                continue
            yield tier, data

    def _hit(self, tier: Tier, key: str, blob: Buffer | None) -> None:
        stats = self._stats[tier.name]
        stats.hits += 1
        self.values.hit(key)
        if blob is not None:
            stats.bytes_read += len(blob)
            if self.promote_on_hit and self.local and tier is not self.local[0]:
                data = blob.cpu().numpy().tobytes() if isinstance(blob, torch.Tensor) \
                    else bytes(blob)
                self._writes.submit(("promote", key, data))

    def _corrupt(self, tier: Tier, key: str, error: Exception) -> None:
        logger.warning("%s tier: object %s is unusable, deleting it: %s", tier.name, key, error)
        self._stats[tier.name].corrupt += 1
        self.t.remove(tier, key)

    # -- writes (on the writer thread) ---------------------------------------------------------

    def put(self, key: str, kv: KVBlocks, first_position: int = 0,
            dependence: float | None = None) -> bool:
        """Store `kv` (whose first token sits at `first_position` in its sequence; a chunk
        variant's `dependence` goes in its header) under `key` in the background; False if the
        write queue was full."""
        self.values.stored(key, kv.num_tokens, dependence)
        return self._writes.submit(("put", key, (kv, first_position, dependence)))

    def free_write_slots(self) -> int:
        """How many more writes the queue takes now."""
        return max(0, self._writes.max_pending - self._writes.pending)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued write is done (tests and benchmarks)."""
        self._writes.flush(timeout)

    # -- introspection -------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        tiers = []
        for tier in self.tiers:
            health, stats = self.health[tier.name], self._stats[tier.name]
            stats.healthy, stats.error = health.healthy, health.error
            stats.writes_paused = time.monotonic() < health.writes_paused_until
            stats.used_bytes = tier.used_bytes
            tiers.append(TierStats(**vars(stats)))
        return StoreStats(self.chunk_tokens, tiers, self.writer.puts, self._writes.dropped,
                          self._writes.pending, dict(self.controller.choices))

    def close(self) -> None:
        self._writes.close()
        for tier in self.tiers:
            tier.close()


def inject_read_faults(tier: str) -> None:
    """Injected store faults (TANDEM_FAULTS) before a tier read: store.delay and store.stall
    sleep, store.fail raises the tier error a failing backend would."""
    faults = active_faults()
    pause = faults.pause(faults.store_delay, faults.store_stall)
    if pause:
        time.sleep(pause)
    if Faults.hit(faults.store_fail):
        raise TierError(f"{tier}: injected store.fail")
