"""`tandem status`: the Admin service's Status as rich tables (or JSON)."""

from __future__ import annotations

import json

from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from tandem.proto.v1 import admin_pb2 as apb


def print_status(status: apb.StatusResponse, as_json: bool = False) -> None:
    console = Console()
    if as_json:
        print(json.dumps(MessageToDict(status, always_print_fields_with_no_presence=True)))
        return
    console.print(f"[bold]{status.model}[/] - up {status.uptime_s:.0f} s, "
                  f"{status.num_requests_running} running, "
                  f"{status.num_requests_waiting} waiting for a worker")
    pools = Table("pool", "workers", "ready", title="Pools", title_justify="left")
    for p in status.pools:
        pools.add_row(p.role, str(p.workers), str(p.ready))
    console.print(pools)
    workers = Table(title="Workers", title_justify="left")
    longest = max((len(w.id) for w in status.workers), default=6)
    workers.add_column("worker", no_wrap=True, min_width=longest)  # ids are copied by hand
    for name in ("role", "state", "KV use", "running", "waiting", "handoffs", "handoff GB/s",
                 "store hit rate", "RSS", "age"):
        workers.add_column(name)
    for w in status.workers:
        tiers = ", ".join(f"{t.tier} {t.hit_rate:.0%}" for t in w.tiers) or "-"
        state = w.state if w.state == "ready" else f"[red]{w.state}[/]"
        workers.add_row(w.id, w.role, state, f"{w.kv_cache_usage:.1%}", str(w.num_running),
                        str(w.num_waiting), str(w.handoffs) if w.role == "prefill" else "-",
                        f"{w.handoff_gbps:.2f}" if w.handoffs else "-", tiers,
                        f"{w.rss_bytes / 2**30:.2f} GiB", f"{w.age_s:.1f} s")
    console.print(workers)
