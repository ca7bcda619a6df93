"""`RedisTier`: the remote tier every worker shares, on a real Redis server.

An object is a small manifest under its key plus its bytes in parts of at most `part_bytes`
under `key#0`, `key#1`, ... (Redis caps a value at 512 MB, and big values stall the server).
The parts and then the manifest are written in one MULTI/EXEC, so a reader never sees half an
object. Redis evicts by itself (run it with `maxmemory` and `maxmemory-policy allkeys-lru`);
a part evicted under a manifest reads as a miss. Every call has a deadline; any Redis error
(down, slow, wrong password, TLS) raises TierUnavailable and the store skips the tier.
"""

from __future__ import annotations

import json

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tandem.kv_store.errors import TierFull, TierUnavailable
from tandem.kv_store.tiers.base import Buffer, Tier

MANIFEST = b"TDPARTS2"
MAX_PART_BYTES = 512 << 20  # Redis's own cap on a value
MAX_OBJECT_BYTES = 16 << 30  # far above any KV object; a manifest claiming more is not ours
MAX_PARTS = 1 << 16  # one MGET of more keys than this is not one of our objects (4 MiB parts)


class RedisTier(Tier):
    shared = True

    def __init__(self, url: str, capacity_bytes: int, *, password: str | None = None,
                 ssl_ca_certs: str | None = None, timeout_s: float = 0.5,
                 part_bytes: int = 4 << 20, name: str = "redis") -> None:
        self.name, self.capacity_bytes, self.part_bytes = name, capacity_bytes, part_bytes
        options = {"ssl_ca_certs": ssl_ca_certs} if ssl_ca_certs else {}
        self.client = redis.Redis.from_url(
            url, password=password, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), **options)
        self.location = url.split("@")[-1]  # never log a password given in the URL

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError) as e:
            raise TierFull(f"redis tier at {self.location} takes no writes: {e}") from None
        except redis.AuthenticationError as e:
            raise TierUnavailable(f"redis tier at {self.location} refused our credentials "
                                  f"({e}); check the Redis password") from None
        except redis.RedisError as e:
            raise TierUnavailable(f"redis tier at {self.location}: {type(e).__name__}: {e}") \
                from None

    def _manifest(self, key: str) -> tuple[int, int, int] | None:
        """(parts, size, part size) of the object under `key`, or None. The manifest comes
        from a shared server, so it is not trusted: its numbers must agree with each other and
        stay within bounds before any part is fetched."""
        raw = self._call(self.client.get, key)
        if raw is None or not raw.startswith(MANIFEST):
            return None
        try:
            meta = json.loads(raw[len(MANIFEST):])
            parts, size, part_bytes = int(meta["parts"]), int(meta["size"]), int(meta["part"])
        except (ValueError, KeyError, TypeError, ArithmeticError):
            return None
        if not (0 < part_bytes <= MAX_PART_BYTES and 0 <= size <= MAX_OBJECT_BYTES
                and 0 < parts <= MAX_PARTS and parts == max(1, -(-size // part_bytes))):
            return None
        return parts, size, part_bytes

    def get(self, key: str) -> Buffer | None:
        manifest = self._manifest(key)
        if manifest is None:
            return None
        parts, size, _ = manifest
        values = self._call(self.client.mget, [f"{key}#{i}" for i in range(parts)])
        if any(v is None for v in values) or sum(map(len, values)) != size:
            self.remove(key)  # a part was evicted: the object is gone
            return None
        return b"".join(values)

    def get_range(self, key: str, offset: int, length: int) -> Buffer | None:
        manifest = self._manifest(key)
        if manifest is None:
            return None
        _, size, p = manifest  # the writer's part size, whatever ours is
        end, pipe = min(offset + length, size), self.client.pipeline(False)
        for part in range(offset // p, -(-end // p)):
            lo, hi = max(offset, part * p), min(end, (part + 1) * p)
            pipe.getrange(f"{key}#{part}", lo - part * p, hi - part * p - 1)
        chunks = self._call(pipe.execute)
        data = b"".join(chunks)
        if len(data) != max(0, end - offset):
            return None
        return data

    def contains(self, key: str) -> bool:
        return bool(self._call(self.client.exists, key))

    def put(self, key: str, data: Buffer) -> None:
        view, pipe = memoryview(data), self.client.pipeline(transaction=True)
        parts = max(1, -(-len(view) // self.part_bytes))
        for i in range(parts):
            pipe.set(f"{key}#{i}", bytes(view[i * self.part_bytes:(i + 1) * self.part_bytes]))
        pipe.set(key, MANIFEST + json.dumps(
            {"parts": parts, "size": len(view), "part": self.part_bytes}).encode())
        self._call(pipe.execute)

    def remove(self, key: str) -> bool:
        manifest = self._manifest(key)
        parts = manifest[0] if manifest else 0
        return bool(self._call(self.client.delete, key, *(f"{key}#{i}" for i in range(parts))))

    def ping(self) -> None:
        self._call(self.client.ping)

    def close(self) -> None:
        self.client.close()
