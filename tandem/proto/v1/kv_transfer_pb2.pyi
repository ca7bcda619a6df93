from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Handoff(_message.Message):
    __slots__ = ("request_id", "kv_header", "output_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KV_HEADER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kv_header: bytes
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., kv_header: _Optional[bytes] = ..., output_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("handoff", "payload")
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    handoff: Handoff
    payload: bytes
    def __init__(self, handoff: _Optional[_Union[Handoff, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class PushKVReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
