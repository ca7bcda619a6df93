"""`OffloadedDecoding`: the decode worker's side of attention offload (Lamina, DistAttention).

An offloaded request holds no KV block here. The router reserves its prompt's token ranges on
attention workers, a prefill worker streams each range's KV to its holder, and then
`start_offloaded` joins the request to this worker's batch with an `OffloadedSequence` whose
holders are channel clients (`attention_worker/channel_client.py`): one persistent stream per
attention worker, shared by every sequence it holds. Each step, the engine's runner sends q
over those streams layer by layer, appends the new token's k/v to each sequence's tail, and
merges the partial results. A holder that fails or misses its deadline finishes only its own
sequences, with `kv_lost`: the router resumes them (KV rebuilt by recomputation).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from tandem.attention_worker.channel_client import ChannelClient
from tandem.engine.offload import OffloadedSequence
from tandem.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class HolderAddress:
    name: str  # the attention worker's id, for messages and stats
    channel: str  # its attention channel, "host:port"


@dataclass(frozen=True)
class HolderTraffic:
    bytes_sent: int  # q and new k/v
    bytes_received: int  # out and lse
    attends: int  # per-layer requests answered
    mean_round_trip_s: float  # q sent -> out and lse back
    dead: str | None


@dataclass(frozen=True)
class OffloadStats:
    num_offloaded: int  # requests in the batch with their KV on attention workers
    steps: int  # offloaded decode steps run
    sequence_steps: int  # tokens they produced
    wait_s: float  # time spent waiting for attention workers' answers
    step_s: float  # the steps' whole time
    holders: dict[str, HolderTraffic] = field(default_factory=dict)

    @property
    def overlap(self) -> float:
        """The share of the attention round trips hidden behind the dense layers (the
        ping-pong pipeline's gain): 1 - waited / round trips."""
        trip = sum(h.mean_round_trip_s * h.attends for h in self.holders.values())
        return max(0.0, 1.0 - self.wait_s / trip) if trip else 0.0


class OffloadedDecoding:
    """Mixin of DecodeWorker, which provides the engine, streams and leases."""

    def _init_offload(self) -> None:
        self._channels: dict[str, ChannelClient] = {}  # by channel address
        # One stream per attention worker, never two: a holder serves each stream in order
        # but streams side by side, and "q before the new k/v" holds only within one stream.
        self._connecting = asyncio.Lock()

    async def expect_offloaded(self, request_id: str) -> None:
        """Open the stream of a request whose KV goes to attention workers: the router polls
        it while the prefill runs, and `start_offloaded` starts it."""
        self.calls["expect_offloaded"] += 1
        await self._open(request_id, lambda e: None)

    async def start_offloaded(self, request_id: str, prompt_token_ids: list[int],
                              output_token_ids: list[int], params: SamplingParams,
                              holders: list[HolderAddress], spill_to: list[HolderAddress]) \
            -> None:
        """Decode a request whose prompt KV the attention workers `holders` hold, by token
        range in order; a full tail moves on to the first of `spill_to` with room."""
        clients = [await self._channel(h) for h in holders]
        spare = []
        for h in spill_to:
            try:
                spare.append(await self._channel(h))
            except Exception:  # one unreachable spare does not stop the request
                continue
        seq = OffloadedSequence(request_id, clients, spare)
        await self._engine.call(lambda e: e.adopt_offloaded(
            request_id, prompt_token_ids, output_token_ids, params, seq), publish_to=request_id)

    async def _channel(self, holder: HolderAddress) -> ChannelClient:
        async with self._connecting:
            client = self._channels.get(holder.channel)
            if client is None or client.dead is not None:  # a restarted worker: a new stream
                timeout = self.config.offload.channel_timeout_s
                client = await asyncio.to_thread(ChannelClient, holder.channel, holder.name,
                                                 timeout)
                self._channels[holder.channel] = client
            return client

    async def offload_stats(self) -> OffloadStats:
        def read(e) -> tuple[int, object]:
            seqs = sum(1 for s in e.seqs.values() if s.offload is not None)
            return seqs, e.runner.offload_totals

        num, totals = await self._engine.call(read)
        holders = {c.name: HolderTraffic(c.stats.bytes_sent, c.stats.bytes_received,
                                         c.stats.attends, c.stats.mean_round_trip_s, c.dead)
                   for c in self._channels.values()}
        return OffloadStats(num, totals.steps, totals.rows, totals.wait_s, totals.step_s,
                            holders)

    def _close_channels(self) -> None:
        for client in self._channels.values():
            client.close()
