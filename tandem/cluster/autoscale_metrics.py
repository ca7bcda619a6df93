"""What `serve --autoscale` exports: each pool's desired replicas and the decisions taken.

The loop keeps `AutoscaleFigures` up to date; the collector reads them at scrape time. Pools
are labelled by role only (three values), never by worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "tandem:"
ROLES = ("prefill", "decode", "attention")


@dataclass
class AutoscaleFigures:
    desired: dict[str, int] = field(default_factory=dict)  # role -> replicas
    decisions: dict[tuple[str, str], int] = field(default_factory=dict)  # (role, up|down)


class AutoscaleCollector(Collector):
    def __init__(self, model_name: str, figures) -> None:
        self.model_name, self.figures = model_name, figures

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        f: AutoscaleFigures = self.figures()
        desired = GaugeMetricFamily(PREFIX + "autoscale_desired_replicas",
                                    "Replicas the autoscaling policy wants in each pool.",
                                    labels=["model_name", "role"])
        for role in ROLES:
            if role in f.desired:
                desired.add_metric([self.model_name, role], f.desired[role])
        yield desired
        decisions = CounterMetricFamily(PREFIX + "autoscale_decisions",
                                        "Scaling actions taken, by pool and direction.",
                                        labels=["model_name", "role", "direction"])
        for role in ROLES:
            for direction in ("up", "down"):
                decisions.add_metric([self.model_name, role, direction],
                                     f.decisions.get((role, direction), 0))
        yield decisions
