"""`TierHealth`: whether the store may use a tier now, with backoff after failures."""

from __future__ import annotations

import logging
import threading
import time

from tandem.kv_store.errors import TierError, TierFull
from tandem.kv_store.tiers.base import Tier

logger = logging.getLogger(__name__)

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
FULL_PAUSE_S = 60.0


class TierHealth:
    """A failing tier is skipped until its retry time, then probed (by one caller at a time)
    with `Tier.ping`; each failure doubles the wait up to `MAX_BACKOFF_S`. A full tier keeps
    serving reads but takes no writes for `FULL_PAUSE_S`."""

    def __init__(self, tier: Tier) -> None:
        self.tier = tier
        self.healthy = True
        self.error: str | None = None
        self.writes_paused_until = 0.0
        self._backoff = FIRST_BACKOFF_S
        self._retry_at = 0.0
        self._probing = threading.Lock()

    def usable(self) -> bool:
        if self.healthy:
            return True
        if time.monotonic() < self._retry_at or not self._probing.acquire(blocking=False):
            return False
        try:
            self.tier.ping()
        except TierError as e:
            self.failed(e)
            return False
        finally:
            self._probing.release()
        logger.warning("%s tier is reachable again; using it", self.tier.name)
        self.healthy, self.error, self._backoff = True, None, FIRST_BACKOFF_S
        return True

    def writable(self) -> bool:
        return time.monotonic() >= self.writes_paused_until and self.usable()

    def failed(self, error: TierError) -> None:
        if isinstance(error, TierFull):
            if time.monotonic() >= self.writes_paused_until:
                logger.warning("%s; no writes to it for %.0f s", error, FULL_PAUSE_S)
            self.writes_paused_until = time.monotonic() + FULL_PAUSE_S
            return
        if self.healthy:
            logger.warning("%s tier marked unhealthy, skipping it: %s", self.tier.name, error)
        else:
            self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
        self.healthy, self.error = False, str(error)
        self._retry_at = time.monotonic() + self._backoff
