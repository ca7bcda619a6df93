from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DrainRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("worker_id", "moved_requests")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MOVED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    moved_requests: int
    def __init__(self, worker_id: _Optional[str] = ..., moved_requests: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStatus(_message.Message):
    __slots__ = ("tier", "hits", "misses", "hit_rate", "bytes_used")
    TIER_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    tier: str
    hits: int
    misses: int
    hit_rate: float
    bytes_used: int
    def __init__(self, tier: _Optional[str] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., hit_rate: _Optional[float] = ..., bytes_used: _Optional[int] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("id", "role", "state", "node", "pod", "kv_cache_usage", "num_running", "num_waiting", "tiers", "handoff_gbps", "handoffs", "age_s", "rss_bytes", "open_requests", "pid", "offload")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_GBPS_FIELD_NUMBER: _ClassVar[int]
    HANDOFFS_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPEN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_FIELD_NUMBER: _ClassVar[int]
    id: str
    role: str
    state: str
    node: str
    pod: str
    kv_cache_usage: float
    num_running: int
    num_waiting: int
    tiers: _containers.RepeatedCompositeFieldContainer[TierStatus]
    handoff_gbps: float
    handoffs: int
    age_s: float
    rss_bytes: int
    open_requests: int
    pid: int
    offload: OffloadStatus
    def __init__(self, id: _Optional[str] = ..., role: _Optional[str] = ..., state: _Optional[str] = ..., node: _Optional[str] = ..., pod: _Optional[str] = ..., kv_cache_usage: _Optional[float] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[TierStatus, _Mapping]]] = ..., handoff_gbps: _Optional[float] = ..., handoffs: _Optional[int] = ..., age_s: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., open_requests: _Optional[int] = ..., pid: _Optional[int] = ..., offload: _Optional[_Union[OffloadStatus, _Mapping]] = ...) -> None: ...

class OffloadStatus(_message.Message):
    __slots__ = ("offloaded_sequences", "steps", "bytes_sent_per_step", "bytes_received_per_step", "layer_round_trip_s", "pipeline_overlap", "kv_held_bytes", "bytes_in", "bytes_out")
    OFFLOADED_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    LAYER_ROUND_TRIP_S_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    KV_HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    offloaded_sequences: int
    steps: int
    bytes_sent_per_step: float
    bytes_received_per_step: float
    layer_round_trip_s: float
    pipeline_overlap: float
    kv_held_bytes: int
    bytes_in: int
    bytes_out: int
    def __init__(self, offloaded_sequences: _Optional[int] = ..., steps: _Optional[int] = ..., bytes_sent_per_step: _Optional[float] = ..., bytes_received_per_step: _Optional[float] = ..., layer_round_trip_s: _Optional[float] = ..., pipeline_overlap: _Optional[float] = ..., kv_held_bytes: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ...) -> None: ...

class PoolStatus(_message.Message):
    __slots__ = ("role", "workers", "ready")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    role: str
    workers: int
    ready: int
    def __init__(self, role: _Optional[str] = ..., workers: _Optional[int] = ..., ready: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("model", "pools", "workers", "num_requests_running", "num_requests_waiting", "uptime_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_WAITING_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    pools: _containers.RepeatedCompositeFieldContainer[PoolStatus]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    num_requests_running: int
    num_requests_waiting: int
    uptime_s: float
    def __init__(self, model: _Optional[str] = ..., pools: _Optional[_Iterable[_Union[PoolStatus, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., num_requests_running: _Optional[int] = ..., num_requests_waiting: _Optional[int] = ..., uptime_s: _Optional[float] = ...) -> None: ...
