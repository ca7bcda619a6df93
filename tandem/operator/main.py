"""`tandem operator`: kopf's wiring, one thin handler per reaction, over `reconcile.Operator`.

- a TandemCluster created, changed or found at start: write the objects it owns;
- while it exists, a daemon: every `autoscaling.intervalSeconds`, a round of the policy and
  the status;
- a Deployment the operator owns changed by someone else: put it back.

Leader election is not needed (one replica, standalone); kopf keeps its handler progress in
annotations.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from tandem.operator.builders import MANAGED_BY
from tandem.operator.errors import SpecInvalid, permanent, temporary
from tandem.operator.reconcile import Operator
from tandem.operator.settings import OperatorSettings
from tandem.operator.spec import GROUP, PLURAL, VERSION

logger = logging.getLogger(__name__)
LIVENESS = "http://0.0.0.0:8080/healthz"  # the chart's probes


def register(operator: Operator, registry: kopf.OperatorRegistry) -> None:
    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.peering.standalone = True
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 60
        settings.networking.request_timeout = operator.settings.api_timeout_s * 3

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)  # in-cluster, else the kubeconfig

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    def reconcile(body: kopf.Body, **_: Any) -> None:
        try:
            done = operator.reconcile(dict(body))
        except SpecInvalid as e:  # written to the status; retried only when the spec changes
            operator.report_invalid(body.metadata.name, body.metadata.namespace,
                                    body.metadata.get("generation", 0), e)
            raise permanent(e) from None
        except Exception as e:  # the API server answered badly or not at all: retry
            raise temporary(e) from None
        logger.info("%s/%s reconciled: %s", body.metadata.namespace, body.metadata.name, done)

    @kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, cancellation_timeout=10.0)
    async def autoscale(stopped: kopf.DaemonStopped, name: str, namespace: str,
                        **_: Any) -> None:
        while not stopped:
            try:
                wait = await asyncio.to_thread(operator.autoscale_round, name, namespace)
            except Exception:  # one bad round must not end the cluster's autoscaling
                logger.exception("%s/%s: the autoscaling round failed", namespace, name)
                wait = 10.0
            if wait is None:
                return
            await stopped.wait(wait)

    @kopf.on.event("apps", "v1", "deployments", registry=registry,
                   labels={"app.kubernetes.io/managed-by": MANAGED_BY})
    def restore(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
        if event.get("type") != "MODIFIED":
            return
        try:
            operator.restore(dict(body))
        except Exception:
            logger.exception("could not put back deployment %s", body.metadata.name)


def run_operator(settings: OperatorSettings) -> None:
    registry = kopf.OperatorRegistry()
    operator = Operator(settings)
    register(operator, registry)
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    asyncio.run(kopf.operator(
        registry=registry, standalone=True, clusterwide=not settings.namespaces,
        namespaces=settings.namespaces or None, liveness_endpoint=LIVENESS))
