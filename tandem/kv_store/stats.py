"""What a store reports: per-tier counters and health, and its write queue."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TierStats:
    name: str
    shared: bool
    codec: str
    healthy: bool = True
    error: str | None = None
    writes_paused: bool = False
    capacity_bytes: int = 0
    used_bytes: int = 0
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    corrupt: int = 0  # objects that failed their checks: deleted and treated as misses


@dataclass(frozen=True)
class StoreStats:
    chunk_tokens: int
    tiers: list[TierStats]
    puts: int = 0
    puts_dropped: int = 0  # the write queue was full
    pending_writes: int = 0
    # The streaming controller's calls on prefix loads: "redis:cachegen:1" (loaded from that
    # tier) or "text" (recomputed instead) -> count
    controller: dict[str, int] = field(default_factory=dict)
