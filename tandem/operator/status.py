"""The TandemCluster's status, built from one round (pure: tested without a cluster)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from tandem.cluster.autoscaler import LoadSample
from tandem.operator.pods import PoolPods


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(kind: str, true: bool, reason: str, message: str,
              previous: list[dict[str, Any]]) -> dict[str, Any]:
    """A condition, keeping its lastTransitionTime while its status holds."""
    status = "True" if true else "False"
    before = next((c for c in previous if c.get("type") == kind), None)
    since = before["lastTransitionTime"] if before and before.get("status") == status \
        and before.get("lastTransitionTime") else _now()
    return {"type": kind, "status": status, "reason": reason, "message": message[:1000],
            "lastTransitionTime": since}


def build_status(generation: int, desired: dict[str, int], held: dict[str, int],
                 reasons: dict[str, str], pods: dict[str, PoolPods], gateway_up: bool,
                 sample: LoadSample | None, problems: list[str], error: str | None,
                 previous: dict[str, Any]) -> dict[str, Any]:
    before = previous.get("conditions") or []
    ready_pools = all(len(pods[r].ready) >= 1 for r in ("prefill", "decode") if r in pods)
    scaling = [r for r in pods if len(pods[r].ready) != desired[r]]
    degraded = error or "; ".join(problems) if (error or any(
        "given up" in p for p in problems)) else ""
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "pools": {r: {"desired": desired[r], "current": held[r], "ready": len(pods[r].ready),
                      "pending": len(pods[r].pending)} for r in pods},
        "lastDecision": {"time": _now(), "reasons": dict(reasons)},
        "error": error,  # None clears it (merge patch; the client sends "" as null)
        "conditions": [
            condition("Ready", gateway_up and ready_pools and not error,
                      "Serving" if gateway_up and ready_pools else "NotServing",
                      "the gateway answers and every pool has a ready worker"
                      if gateway_up and ready_pools else
                      ("; ".join(problems) or "waiting for pods to become ready"), before),
            condition("Scaling", bool(scaling), "Resizing" if scaling else "Steady",
                      ", ".join(f"{r}: {len(pods[r].ready)} ready of {desired[r]}"
                                for r in scaling) or "every pool at its size", before),
            condition("Degraded", bool(degraded), "Failing" if degraded else "Healthy",
                      degraded or "no failure", before),
        ],
    }
    if sample is not None:
        status["observed"] = {"ttftSeconds": sample.ttft_s, "itlSeconds": sample.itl_s,
                              "requestsPerSecond": round(sample.arrival_rate, 3)}
    return status
