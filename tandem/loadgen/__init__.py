"""Load generation for Tandem: workloads, traces, backends, and the statistics of a run.

    from tandem.loadgen import (HttpBackend, LengthRange, load_trace, run_load, summarize,
                                synthetic_workload, trace_workload)

    rows = load_trace("conv")  # the shipped Azure 2023 conversation trace, as TraceRows
    workload = trace_workload(rows, rate_scale=0.02, duration_s=120, max_prompt=2000)
    async with HttpBackend("http://127.0.0.1:8000") as backend:
        await backend.served_model()
        run = await run_load(workload, backend, max_concurrency=8)
    print(summarize(run.results).to_dict())

`tandem bench` (`cli.bench`) is this as a command. The backends load lazily, so the trace and
workload code needs neither grpcio nor httpx (a simulator can use it alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tandem.loadgen.backend import Backend, RequestResult, ServedModel
from tandem.loadgen.metrics import LatencyStats, Slo, Summary, percentile, summarize
from tandem.loadgen.runner import LoadRun, ProgressHook, run_load, warm_up
from tandem.loadgen.trace import TRACE_NAMES, TraceRow, load_trace
from tandem.loadgen.workload import (
    LengthRange,
    Request,
    Workload,
    synthetic_workload,
    trace_workload,
)

__all__ = [
    "TRACE_NAMES",
    "Backend",
    "GrpcBackend",
    "HttpBackend",
    "LatencyStats",
    "LengthRange",
    "LoadRun",
    "ProgressHook",
    "Request",
    "RequestResult",
    "ServedModel",
    "Slo",
    "Summary",
    "TraceRow",
    "Workload",
    "load_trace",
    "percentile",
    "run_load",
    "summarize",
    "synthetic_workload",
    "trace_workload",
    "warm_up",
]

_LAZY = {
    "GrpcBackend": "tandem.loadgen.grpc_backend",
    "HttpBackend": "tandem.loadgen.http_backend",
}

if TYPE_CHECKING:
    from tandem.loadgen.grpc_backend import GrpcBackend
    from tandem.loadgen.http_backend import HttpBackend


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tandem.loadgen' has no attribute {name!r}")
