"""The TandemCluster resource (`tandem.dev/v1alpha1`) as typed models, and its one-to-one
mapping onto `ServeConfig` and the autoscaler's config.

The CRD's OpenAPI schema is generated from these models (`tandem.operator.crd`), so the
schema the API server enforces, the operator's parsing and the mapping below cannot drift apart
without a test failing (`tests/test_operator_spec.py`). Field names are camelCase, as
Kubernetes resources spell them; `MAPPING` names the ServeConfig key each one sets.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from tandem.cluster.autoscaler import AutoscaleConfig, PoolsConfig, SLOConfig

GROUP, VERSION, PLURAL, KIND = "tandem.dev", "v1alpha1", "tandemclusters", "TandemCluster"
POOL_ROLES = ("prefill", "decode", "attention")
SHIPPED_PROFILE = "tandem/sim/profiles/llama-3-8b-h200.json"  # inside the package
GRPC_PORT, HTTP_PORT, RAY_PORT = 50051, 8000, 6379


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel,
                              populate_by_name=True)


class PoolSpec(_Spec):
    replicas: int = Field(1, ge=0, description="Replicas with autoscaling off; the starting "
                          "size with it on.")
    min: int = Field(1, ge=0, description="Fewest replicas autoscaling keeps.")
    max: int = Field(16, ge=0, description="Most replicas autoscaling starts.")
    gpus: int = Field(1, ge=0, description="nvidia.com/gpu each pod asks for; 0 on CPU nodes.")
    resources: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Extra container resources: {requests: {...}, "
        "limits: {...}}.")
    node_selector: dict[str, str] = Field(default_factory=dict,
                                          description="Node labels the pods need.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list,
                                              description="Taints the pods tolerate.")
    affinity: dict[str, Any] = Field(default_factory=dict, description="Pod affinity rules.")

    @model_validator(mode="after")
    def _ordered(self) -> PoolSpec:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) exceeds max ({self.max})")
        return self


class PoolsSpec(_Spec):
    prefill: PoolSpec = Field(default_factory=PoolSpec)
    decode: PoolSpec = Field(default_factory=PoolSpec)
    attention: PoolSpec = Field(default_factory=lambda: PoolSpec(replicas=0, min=0, max=0))


class SLOSpec(_Spec):
    ttft_seconds: float = Field(2.0, gt=0, description="Time-to-first-token target.")
    itl_seconds: float = Field(0.05, gt=0, description="Mean inter-token latency target.")
    percentile: float = Field(90.0, gt=0, le=100, description="The percentile held to them.")


class AutoscalingSpec(_Spec):
    enabled: bool = Field(False, description="The operator resizes the pools to the load.")
    interval_seconds: float = Field(10.0, gt=0, description="How often the policy runs.")
    scale_up_window_seconds: float = Field(0.0, ge=0, description="Scale-up stabilisation.")
    scale_down_window_seconds: float = Field(60.0, ge=0,
                                             description="Scale-down stabilisation.")
    scale_down_step: float = Field(0.02, gt=0, le=1, description="Largest share of a pool "
                                   "one scale-down removes (at least one replica).")
    predictor: Literal["constant", "ewma"] = Field("constant", description="Load predictor.")
    ewma_alpha: float = Field(0.5, gt=0, le=1, description="The smoother's newest weight.")
    pending_timeout_seconds: float = Field(300.0, gt=0, description="A pod not ready this "
                                           "long is given up.")
    headroom: float = Field(1.2, ge=1, description="Capacity over the predicted load.")
    kv_high: float = Field(0.9, gt=0, le=1, description="Decode KV use that adds a replica.")
    queue_per_replica: float = Field(4.0, gt=0, description="Queued requests per replica "
                                     "that add one.")
    profile: str = Field(SHIPPED_PROFILE, description="Replica profile JSON in the image "
                         "(relative paths: inside the tandem package).")


class StoreSpec(_Spec):
    enabled: bool = Field(True, description="Reuse cached prefixes across requests.")
    redis_url: str | None = Field(None, description="redis:// URL of the shared tier; "
                                  "None = no Redis tier.")
    redis_password_secret: str | None = Field(
        None, description="Secret whose key `password` holds the Redis password.")
    cpu_gb: float = Field(2.0, ge=0, description="CPU tier per worker, GiB.")
    ssd_gb: float = Field(0.0, ge=0, description="SSD tier per worker, GiB (an emptyDir).")


class TLSSpec(_Spec):
    secret_name: str = Field(description="kubernetes.io/tls Secret the gateway serves with.")
    client_auth: bool = Field(False, description="Require client certificates signed by the "
                              "Secret's ca.crt (mTLS).")


class TandemClusterSpec(_Spec):
    model: str | None = Field(None, description="Model path inside the image (HF directory "
                              "or .gguf); None = the embedded SmolLM2-135M.")
    served_model_name: str | None = Field(None, description="Model id clients use.")
    image: str = Field(description="Tandem image, e.g. ghcr.io/tandem/tandem:0.1.0-gpu.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list,
                                          description="Secrets to pull the image with.")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    kv_transport: Literal["auto", "nixl", "grpc"] = Field("auto", description="KV handoff.")
    pools: PoolsSpec = Field(default_factory=PoolsSpec)
    slo: SLOSpec = Field(default_factory=SLOSpec)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    store: StoreSpec = Field(default_factory=StoreSpec)
    tls: TLSSpec | None = None
    api_key_secret: str | None = Field(None, description="Secret whose key `api-keys` holds "
                                       "the clients' keys, comma-separated.")

    def pool(self, role: str) -> PoolSpec:
        return getattr(self.pools, role)


# Where each spec field lands: ServeConfig keys (dotted) or, for `autoscaling.*`, the
# AutoscaleConfig the operator runs the policy with. Fields about pods (image, resources,
# selectors, secrets) land on the objects the operator writes instead (builders.py).
MAPPING: dict[str, str] = {
    "model": "worker.engine.model",
    "servedModelName": "served_model_name",
    "dtype": "worker.engine.dtype",
    "kvTransport": "worker.kv_transport",
    "pools.prefill.replicas": "prefill_workers",
    "pools.decode.replicas": "decode_workers",
    "pools.attention.replicas": "attention_workers",
    **{f"pools.{role}.{bound}": f"pools.{role}.{bound}"
       for role in POOL_ROLES for bound in ("min", "max")},
    "slo.ttftSeconds": "slo.ttft_s",
    "slo.itlSeconds": "slo.itl_s",
    "slo.percentile": "slo.percentile",
    "autoscaling.enabled": "autoscale.enabled",
    "autoscaling.intervalSeconds": "autoscale.interval_s",
    "autoscaling.scaleUpWindowSeconds": "autoscale.scale_up_window_s",
    "autoscaling.scaleDownWindowSeconds": "autoscale.scale_down_window_s",
    "autoscaling.scaleDownStep": "autoscale.scale_down_step",
    "autoscaling.predictor": "autoscale.predictor",
    "autoscaling.ewmaAlpha": "autoscale.ewma_alpha",
    "autoscaling.pendingTimeoutSeconds": "autoscale.pending_timeout_s",
    "autoscaling.headroom": "autoscale.headroom",
    "autoscaling.kvHigh": "autoscale.kv_high",
    "autoscaling.queuePerReplica": "autoscale.queue_per_replica",
    "autoscaling.profile": "autoscale.profile",
    "store.enabled": "worker.kv_store.enabled",
    "store.redisUrl": "worker.kv_store.redis.url",
    "store.cpuGb": "worker.kv_store.cpu_gb",
    "store.ssdGb": "worker.kv_store.ssd_gb",
    "tls.secretName": "gateway.tls.cert",  # and .key: the Secret's files, mounted
    "tls.clientAuth": "gateway.tls.client_ca",
    "apiKeySecret": "gateway.api_keys",  # through TANDEM_API_KEY, from the Secret
    "store.redisPasswordSecret": "worker.kv_store.redis.password",  # TANDEM_REDIS_PASSWORD
}
# Spec fields that describe the pods, not the server.
POD_FIELDS = ("image", "imagePullPolicy", "imagePullSecrets", "pools.*.gpus",
              "pools.*.resources", "pools.*.nodeSelector", "pools.*.tolerations",
              "pools.*.affinity")
TLS_DIR = "/etc/tandem/tls"


def autoscale_config(spec: TandemClusterSpec) -> AutoscaleConfig:
    a = spec.autoscaling
    return AutoscaleConfig(
        enabled=a.enabled, profile=a.profile, interval_s=a.interval_seconds,
        scale_up_window_s=a.scale_up_window_seconds,
        scale_down_window_s=a.scale_down_window_seconds, scale_down_step=a.scale_down_step,
        predictor=a.predictor, ewma_alpha=a.ewma_alpha,
        pending_timeout_s=a.pending_timeout_seconds, headroom=a.headroom, kv_high=a.kv_high,
        queue_per_replica=a.queue_per_replica)


def pools_config(spec: TandemClusterSpec) -> PoolsConfig:
    return PoolsConfig.model_validate(
        {role: {"min": spec.pool(role).min, "max": spec.pool(role).max} for role in POOL_ROLES})


def slo_config(spec: TandemClusterSpec) -> SLOConfig:
    return SLOConfig(ttft_s=spec.slo.ttft_seconds, itl_s=spec.slo.itl_seconds,
                     percentile=spec.slo.percentile)


def serve_config_data(spec: TandemClusterSpec) -> dict[str, Any]:
    """The head's `tandem serve --config` YAML, as data: the spec through `MAPPING`, plus what
    running in a pod fixes (join the pod's Ray head, follow the pool nodes, bind all
    addresses). The policy runs in the operator, so the head's own loop stays off."""
    store: dict[str, Any] = {"enabled": spec.store.enabled, "cpu_gb": spec.store.cpu_gb,
                             "ssd_gb": spec.store.ssd_gb,
                             "redis": {"url": spec.store.redis_url, "embedded": False}}
    gateway: dict[str, Any] = {"host": "0.0.0.0", "port": GRPC_PORT, "http_port": HTTP_PORT}
    if spec.tls is not None:
        gateway["tls"] = {"cert": f"{TLS_DIR}/tls.crt", "key": f"{TLS_DIR}/tls.key",
                          "client_ca": f"{TLS_DIR}/ca.crt" if spec.tls.client_auth else None}
    auto = autoscale_config(spec).model_dump()
    auto["enabled"] = False
    return {
        "served_model_name": spec.served_model_name,
        "prefill_workers": max(spec.pools.prefill.replicas, 1),
        "decode_workers": max(spec.pools.decode.replicas, 1),
        "attention_workers": spec.pools.attention.replicas,
        "follow_nodes": True,
        "worker": {"engine": {"model": spec.model, "dtype": spec.dtype},
                   "kv_transport": spec.kv_transport, "kv_store": store},
        "gateway": gateway,
        "ray": {"address": "auto"},
        "autoscale": auto,
        "pools": pools_config(spec).model_dump(),
        "slo": slo_config(spec).model_dump(),
    }
