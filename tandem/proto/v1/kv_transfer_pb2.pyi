from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Begin(_message.Message):
    __slots__ = ("request_id", "kv_header")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KV_HEADER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kv_header: bytes
    def __init__(self, request_id: _Optional[str] = ..., kv_header: _Optional[bytes] = ...) -> None: ...

class PieceHeader(_message.Message):
    __slots__ = ("first_layer", "num_layers", "first_block", "num_blocks", "checksum", "codec", "payload_bytes")
    FIRST_LAYER_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    first_layer: int
    num_layers: int
    first_block: int
    num_blocks: int
    checksum: int
    codec: str
    payload_bytes: int
    def __init__(self, first_layer: _Optional[int] = ..., num_layers: _Optional[int] = ..., first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., checksum: _Optional[int] = ..., codec: _Optional[str] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class End(_message.Message):
    __slots__ = ("kv_header", "output_token_ids", "exact_tokens")
    KV_HEADER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EXACT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    kv_header: bytes
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    exact_tokens: int
    def __init__(self, kv_header: _Optional[bytes] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., exact_tokens: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("begin", "payload", "piece", "end")
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    begin: Begin
    payload: bytes
    piece: PieceHeader
    end: End
    def __init__(self, begin: _Optional[_Union[Begin, _Mapping]] = ..., payload: _Optional[bytes] = ..., piece: _Optional[_Union[PieceHeader, _Mapping]] = ..., end: _Optional[_Union[End, _Mapping]] = ...) -> None: ...

class PushKVReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
