"""`KVIndex`: the router's picture of which prefix chunks each prefill worker holds locally.

Each prefill worker's store logs the keys entering and leaving its local tiers (GPU, CPU, SSD);
the index polls those changes every `POLL_S`, so routing never waits on a worker. The picture
may lag by a poll: a stale hit costs only a recompute, never a wrong answer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tandem.kv_store import keys

logger = logging.getLogger(__name__)

POLL_S = 0.5


class KVIndex:
    def __init__(self, workers: list[Any], namespace: str, chunk_tokens: int,
                 call_timeout_s: float) -> None:
        self.workers, self.namespace, self.chunk_tokens = workers, namespace, chunk_tokens
        self.call_timeout_s = call_timeout_s
        self.keys: list[set[str]] = [set() for _ in workers]
        self.versions = [0] * len(workers)
        self._task: asyncio.Task | None = None

    def prefix_keys(self, prompt: list[int], salt: str | None = None) -> list[str]:
        """Keys of the chunks a prefill of `prompt` could reuse (it computes the last token)."""
        return keys.prefix_keys(keys.salted(self.namespace, salt), prompt[:-1],
                                self.chunk_tokens)

    def cached_tokens(self, worker: int, prefix_keys: list[str]) -> int:
        """Tokens of the longest run of `prefix_keys` that `worker` holds locally."""
        held = self.keys[worker]
        run = next((i for i, key in enumerate(prefix_keys) if key not in held), len(prefix_keys))
        return run * self.chunk_tokens

    async def refresh(self) -> None:
        """Apply every worker's changes since the last refresh (a worker that fails to answer
        keeps its last picture)."""
        known = list(zip(self.workers, self.versions, strict=False))  # a slot may be new
        results = await asyncio.gather(*(
            asyncio.wait_for(w.kv_index_changes.remote(v), self.call_timeout_s)
            for w, v in known), return_exceptions=True)
        for i, delta in enumerate(results):
            if isinstance(delta, BaseException):
                logger.debug("prefill worker %d: no KV index update: %r", i, delta)
                continue
            if delta is None:
                continue
            if delta.full:
                self.keys[i] = set(delta.added)
            else:
                self.keys[i].update(delta.added)
                self.keys[i].difference_update(delta.removed)
            self.versions[i] = delta.version

    def slot_changed(self, slot: int) -> None:
        """The prefill worker in `slot` was added or replaced: start its picture afresh."""
        while len(self.keys) <= slot:
            self.keys.append(set())
            self.versions.append(0)
        self.keys[slot], self.versions[slot] = set(), 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(POLL_S)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
