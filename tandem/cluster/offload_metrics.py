"""Attention offload's figures, from the workers' stats: for the Admin status and `/metrics`.

A decode worker reports its offloaded sequences and, per attention worker it talks to, the
channel's bytes each way, answered requests and summed round trips (`OffloadStats`); an
attention worker reports the KV it holds and its channel's bytes (`AttentionStats`). These are
summed over the pool here, at scrape time, from the monitor's last snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tandem.proto.v1 import admin_pb2 as apb
from tandem.worker_base import WorkerStats

PREFIX = "tandem:"


@dataclass(frozen=True)
class OffloadFigures:
    offloaded_sequences: int = 0
    steps: int = 0
    bytes_sent: int = 0  # decode -> attention workers
    bytes_received: int = 0  # back
    attends: int = 0
    round_trip_s: float = 0.0  # summed over attends
    wait_s: float = 0.0
    kv_held_bytes: dict[str, int] = field(default_factory=dict)  # attention worker id -> bytes

    @property
    def layer_round_trip_s(self) -> float:
        return self.round_trip_s / self.attends if self.attends else 0.0

    @property
    def overlap(self) -> float:
        return max(0.0, 1.0 - self.wait_s / self.round_trip_s) if self.round_trip_s else 0.0


def offload_figures(workers: list[tuple[str, WorkerStats]]) -> OffloadFigures:
    seqs = steps = sent = received = attends = 0
    trip = wait = 0.0
    held = {}
    for worker_id, s in workers:
        if s.offload is not None:
            o = s.offload
            seqs += o.num_offloaded
            steps += o.steps
            wait += o.wait_s
            for h in o.holders.values():
                sent += h.bytes_sent
                received += h.bytes_received
                attends += h.attends
                trip += h.mean_round_trip_s * h.attends
        if s.attention is not None:
            held[worker_id] = s.attention.held_bytes
    return OffloadFigures(seqs, steps, sent, received, attends, trip, wait, held)


def offload_status(s: WorkerStats) -> apb.OffloadStatus | None:
    """One worker's part of the Admin status (None for workers without offload figures)."""
    if s.attention is not None:
        c = s.attention.channel
        return apb.OffloadStatus(offloaded_sequences=s.attention.num_sequences,
                                 kv_held_bytes=s.attention.held_bytes, bytes_in=c.bytes_in,
                                 bytes_out=c.bytes_out)
    o = s.offload
    if o is None or not (o.steps or o.num_offloaded):
        return None
    f = offload_figures([("", s)])
    per_step = max(o.steps, 1)
    return apb.OffloadStatus(offloaded_sequences=o.num_offloaded, steps=o.steps,
                             bytes_sent_per_step=f.bytes_sent / per_step,
                             bytes_received_per_step=f.bytes_received / per_step,
                             layer_round_trip_s=f.layer_round_trip_s,
                             pipeline_overlap=o.overlap)


class OffloadCollector(Collector):
    """Reads `figures()` (the monitor's last snapshot) and the router's count at scrape time."""

    def __init__(self, model_name: str, figures, num_offloaded) -> None:
        self.model_name, self.figures, self.num_offloaded = model_name, figures, num_offloaded

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        f: OffloadFigures = self.figures()
        model = self.model_name
        seqs = GaugeMetricFamily(PREFIX + "attention_offloaded_sequences",
                                 "Sequences decoding with their KV on attention workers.",
                                 labels=["model_name"])
        seqs.add_metric([model], f.offloaded_sequences)
        yield seqs
        requests = CounterMetricFamily(PREFIX + "attention_offloaded_requests",
                                       "Requests placed with offloaded attention.",
                                       labels=["model_name"])
        requests.add_metric([model], self.num_offloaded())
        yield requests
        steps = CounterMetricFamily(PREFIX + "attention_offload_steps",
                                    "Decode steps run with offloaded attention.",
                                    labels=["model_name"])
        steps.add_metric([model], f.steps)
        yield steps
        moved = CounterMetricFamily(PREFIX + "attention_channel_bytes",
                                    "Bytes on the attention channels (divide by "
                                    "attention_offload_steps for bytes per step).",
                                    labels=["model_name", "direction"])
        moved.add_metric([model, "to_attention"], f.bytes_sent)
        moved.add_metric([model, "from_attention"], f.bytes_received)
        yield moved
        trip = GaugeMetricFamily(PREFIX + "attention_layer_round_trip_seconds",
                                 "Mean per-layer round trip to an attention worker (q out, "
                                 "out and lse back).", labels=["model_name"])
        trip.add_metric([model], f.layer_round_trip_s)
        yield trip
        overlap = GaugeMetricFamily(PREFIX + "attention_pipeline_overlap",
                                    "Share of the attention round trips hidden behind the "
                                    "dense layers (ping-pong pipeline), 0..1.",
                                    labels=["model_name"])
        overlap.add_metric([model], f.overlap)
        yield overlap
        held = GaugeMetricFamily(PREFIX + "attention_kv_held_bytes",
                                 "KV bytes each attention worker holds.",
                                 labels=["model_name", "worker"])
        for worker, value in sorted(f.kv_held_bytes.items()):
            held.add_metric([model, worker], value)
        yield held
