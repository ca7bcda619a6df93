"""What the operator asks a cluster's gateway: its metrics page (HTTP), its workers and a
drain (gRPC Admin), each with a deadline. Reached through the head's Service, or at the
addresses in the operator's settings."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tandem.client import Client
from tandem.cluster.load_window import summed_families
from tandem.operator.builders import head_name
from tandem.operator.settings import OperatorSettings
from tandem.operator.spec import GRPC_PORT, HTTP_PORT
from tandem.proto.v1 import admin_pb2 as apb


@dataclass(frozen=True)
class MetricsPage:
    families: dict[str, float]  # summed over labels, as `LoadWindow` reads them
    waiting: int  # requests the gateway holds that no worker runs yet
    decode_kv_use: float  # the decode workers' mean KV use


def read_metrics_page(text: str) -> MetricsPage:
    waiting, usages = 0.0, []
    families = list(text_string_to_metric_families(text))  # parsed once, read twice
    for family in families:
        for s in family.samples:
            if s.name == "tandem:num_requests_waiting":
                waiting += s.value
            elif s.name == "tandem:kv_cache_usage_perc" and \
                    s.labels.get("role") in ("decode", "colocated"):
                usages.append(s.value)
    return MetricsPage(summed_families(families), int(waiting),
                       sum(usages) / len(usages) if usages else 0.0)


class GatewayClient:
    def __init__(self, name: str, namespace: str, settings: OperatorSettings,
                 api_key: str | None = None, root_certificates: bytes | None = None) -> None:
        service = f"{head_name(name)}.{namespace}.svc"
        tls = root_certificates is not None
        self.http = settings.gateway_http or f"{'https' if tls else 'http'}://{service}:{HTTP_PORT}"
        self.grpc = settings.gateway_grpc or f"{service}:{GRPC_PORT}"
        self.settings, self.api_key = settings, api_key
        self.verify: ssl.SSLContext | bool = ssl.create_default_context(
            cadata=root_certificates.decode()) if root_certificates else True
        self.client = Client(self.grpc, tls=tls, root_certificates=root_certificates,
                             api_key=api_key, timeout=settings.api_timeout_s, max_retries=1)

    def metrics(self) -> MetricsPage:
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        response = httpx.get(f"{self.http.rstrip('/')}/metrics", headers=headers,
                             timeout=self.settings.api_timeout_s, verify=self.verify)
        response.raise_for_status()
        return read_metrics_page(response.text)

    def status(self) -> apb.StatusResponse:
        return self.client.status()

    def drain(self, worker_id: str) -> apb.DrainResponse:
        return self.client.drain(worker_id, timeout=self.settings.drain_timeout_s)

    def close(self) -> None:
        self.client.close()
