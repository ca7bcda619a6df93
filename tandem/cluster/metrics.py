"""Prometheus metrics of a Tandem cluster, named after vLLM's with a `tandem:` prefix.

Request figures (latencies, token counts, finish reasons, handoffs, blending) are recorded by
the gateway as each request ends. Worker figures (KV use, store tiers, CacheGen choices, pool
sizes) come from `WorkerFigures`, a snapshot the gateway refreshes off the request path
(`cluster/worker_status.py`), and are read from it at scrape time by a custom collector. Every
label is bounded: model, finish reason, worker id (the pool size), role, tier, transport and
streaming mode, CacheGen level; never a request or a chunk.

Where Tandem differs from vLLM: `kv_cache_usage_perc` carries `worker` and `role` labels (there
are several engines), and the `tandem:kv_store_*`, `tandem:kv_handoff_*`,
`tandem:cachegen_level_choices`, `tandem:blend_recomputed_tokens` and `tandem:pool_workers`
families are Tandem's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tandem.cluster.autoscale_metrics import AutoscaleCollector, AutoscaleFigures
from tandem.cluster.offload_metrics import OffloadCollector, OffloadFigures

PREFIX = "tandem:"
disable_created_metrics()  # no `_created` series: they double the scrape and nothing reads them
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 10.0, 20.0, 80.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                 100000, 200000)


@dataclass(frozen=True)
class TierFigures:
    """Cumulative figures of one store tier, summed over the workers that have it."""

    hits: int = 0
    misses: int = 0
    used_bytes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    corrupt: int = 0


CHUNK_REUSE_COUNTERS = {  # ChunkReuseSnapshot field -> the metric's help, summed over workers
    "blends": "Segmented prompts whose chunks were blended from chunk caches.",
    "chunk_hits": "Chunks whose KV came from a chunk cache (their own or a variant).",
    "variant_hits": "Chunks whose KV came from a variant computed in a real context.",
    "matched_context_chunks": "Preceding chunks matched by the variants used, summed.",
    "recomputed_tokens": "Chunk tokens recomputed while blending.",
    "saved_tokens": "Chunk tokens loaded from chunk caches and not recomputed.",
    "captured": "Chunk variants kept from full prefills.",
    "cold": "Segmented prompts with no chunk cached, prefilled in full.",
}


@dataclass(frozen=True)
class WorkerFigures:
    """What the gateway last gathered from the workers (`worker_status.WorkerMonitor`)."""

    kv_cache_usage: dict[tuple[str, str], float] = field(default_factory=dict)  # (id, role)
    tiers: dict[str, TierFigures] = field(default_factory=dict)
    cachegen_levels: dict[str, int] = field(default_factory=dict)  # level -> pieces coded
    pool_workers: dict[str, int] = field(default_factory=dict)  # role -> workers
    num_running: int = 0  # sequences in the decode workers' batches
    offload: OffloadFigures = field(default_factory=OffloadFigures)
    chunk_reuse: dict[str, int] = field(default_factory=dict)  # CHUNK_REUSE_COUNTERS -> sum


class _WorkerCollector(Collector):
    """Reads the latest `WorkerFigures` at scrape time: no worker call on the scrape path."""

    def __init__(self, metrics: ClusterMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:  # lets the registry list the families up front
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        f, model = m.workers, m.model_name
        usage = GaugeMetricFamily(PREFIX + "kv_cache_usage_perc",
                                  "KV-cache usage of each worker, 1 = full.",
                                  labels=["model_name", "worker", "role"])
        for (worker, role), value in sorted(f.kv_cache_usage.items()):
            usage.add_metric([model, worker, role], value)
        yield usage
        tier_counters = {
            "hits": "Store lookups served by the tier.",
            "misses": "Store lookups the tier could not serve.",
            "read_bytes": "Bytes read from the tier.",
            "written_bytes": "Bytes written to the tier.",
            "evictions": "Objects the tier evicted.",
            "corrupt_objects": "Objects that failed their checks (deleted, served as misses).",
        }
        families = {name: CounterMetricFamily(f"{PREFIX}kv_store_{name}", text,
                                              labels=["model_name", "tier"])
                    for name, text in tier_counters.items()}
        used = GaugeMetricFamily(PREFIX + "kv_store_used_bytes", "Bytes held by the tier.",
                                 labels=["model_name", "tier"])
        for tier, t in sorted(f.tiers.items()):
            values = {"hits": t.hits, "misses": t.misses, "read_bytes": t.bytes_read,
                      "written_bytes": t.bytes_written, "evictions": t.evictions,
                      "corrupt_objects": t.corrupt}
            for name, value in values.items():
                families[name].add_metric([model, tier], value)
            used.add_metric([model, tier], t.used_bytes)
        yield from families.values()
        yield used
        levels = CounterMetricFamily(PREFIX + "cachegen_level_choices",
                                     "KV pieces coded at each CacheGen level (cachegen:auto).",
                                     labels=["model_name", "level"])
        for level, count in sorted(f.cachegen_levels.items()):
            levels.add_metric([model, level], count)
        yield levels
        for name, text in CHUNK_REUSE_COUNTERS.items():  # aggregates only: no chunk labels
            family = CounterMetricFamily(f"{PREFIX}chunk_cache_{name}", text,
                                         labels=["model_name"])
            family.add_metric([model], f.chunk_reuse.get(name, 0))
            yield family
        pools = GaugeMetricFamily(PREFIX + "pool_workers", "Workers in each pool.",
                                  labels=["model_name", "role"])
        for role, count in sorted(f.pool_workers.items()):
            pools.add_metric([model, role], count)
        yield pools
        running = GaugeMetricFamily(PREFIX + "num_requests_running",
                                    "Requests in the decode workers' batches.",
                                    labels=["model_name"])
        running.add_metric([model], f.num_running)
        yield running
        waiting = GaugeMetricFamily(PREFIX + "num_requests_waiting",
                                    "Requests admitted by the gateway and not yet decoding.",
                                    labels=["model_name"])
        waiting.add_metric([model], m.num_waiting())
        yield waiting
        resumed = CounterMetricFamily(PREFIX + "request_resumed",
                                      "Requests resumed on other workers after their decode "
                                      "worker was lost.", labels=["model_name"])
        resumed.add_metric([model], m.num_resumed())
        yield resumed
        migrated = CounterMetricFamily(PREFIX + "request_migrated",
                                       "Requests moved to another decode worker with their KV "
                                       "(drains, rebalancing).", labels=["model_name"])
        migrated.add_metric([model], m.num_migrated())
        yield migrated


class ClusterMetrics:
    """Every metric family Tandem exports, in its own registry (served at `/metrics`)."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        self.registry = registry or CollectorRegistry()
        self.workers = WorkerFigures()
        self.num_waiting = lambda: 0  # the router's queue, set by the gateway
        self.num_resumed = lambda: 0  # the router's resumes, set by the gateway
        self.num_migrated = lambda: 0  # the router's live migrations, set by the gateway
        self.num_offloaded = lambda: 0  # requests placed with offloaded attention
        self.autoscale = AutoscaleFigures()  # kept by serve --autoscale
        r, labels = self.registry, ["model_name"]

        def histogram(name: str, text: str, buckets: tuple[float, ...],
                      extra: tuple[str, ...] = ()) -> Histogram:
            return Histogram(PREFIX + name, text, [*labels, *extra], registry=r, buckets=buckets)

        def counter(name: str, text: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, text, [*labels, *extra], registry=r)

        self.ttft = histogram("time_to_first_token_seconds",
                              "Request received by the gateway -> first token sent.",
                              LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds",
                             "Time between consecutive token deltas of a request.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds",
                             "Request received -> last token sent.", LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Time a request waited for KV blocks on a decode worker.",
                                    LATENCY_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds",
                                      "Arrival on the prefill worker -> first token.",
                                      LATENCY_BUCKETS)
        self.prompt_tokens_hist = histogram("request_prompt_tokens",
                                            "Prompt tokens per request.", TOKEN_BUCKETS)
        self.generation_tokens_hist = histogram("request_generation_tokens",
                                                "Generated tokens per request.", TOKEN_BUCKETS)
        self.requests_received = counter("requests_received",
                                         "Requests the gateway accepted (the arrival rate).")
        self.prompt_tokens_received = counter("prompt_tokens_received",
                                              "Prompt tokens of accepted requests.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens",
                                         "Tokens generated for finished requests.")
        self.request_success = counter("request_success",
                                       "Requests that finished, by finish reason.",
                                       ("finished_reason",))
        self.request_failure = counter("request_failure",
                                       "Requests that ended with an error, by its code.",
                                       ("code",))
        self.prefix_cache_queries = counter("prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix caches.")
        self.prefix_cache_hits = counter("prefix_cache_hits",
                                         "Prompt tokens whose KV came from a cache.")
        self.handoff_bytes = counter("kv_handoff_bytes",
                                     "KV bytes handed from prefill to decode workers (the "
                                     "blocks' uncompressed size).", ("transport", "mode"))
        self.handoff_seconds = histogram("kv_handoff_seconds",
                                         "Exposed KV handoff time per request: first token -> "
                                         "the decode worker holds the KV.", LATENCY_BUCKETS,
                                         ("transport", "mode"))
        self.blend_recomputed_tokens = counter("blend_recomputed_tokens",
                                               "Blended chunk tokens whose KV was recomputed "
                                               "(CacheBlend).")
        self.blend_cached_tokens = counter("blend_reused_tokens",
                                           "Prompt tokens of segmented prompts whose KV was "
                                           "reused from a cache.")
        self.registry.register(_WorkerCollector(self))
        self.registry.register(OffloadCollector(model_name, lambda: self.workers.offload,
                                                lambda: self.num_offloaded()))
        self.registry.register(AutoscaleCollector(model_name, lambda: self.autoscale))

    def labels(self, metric: Counter | Histogram, *values: str):
        return metric.labels(self.model_name, *values)

    def family_names(self) -> set[str]:
        """The metric family names registered here (what a dashboard may query)."""
        names: set[str] = set()
        for family in self.registry.collect():
            names.add(family.name)
            if family.type == "counter":
                names.add(family.name + "_total")
            if family.type == "histogram":
                names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
        return names
