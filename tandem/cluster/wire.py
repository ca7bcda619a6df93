"""The gateway's services on a gRPC server, with requests parsed leniently.

grpc answers a request that does not parse (bad UTF-8 in a string, a truncated message) with
INTERNAL "Exception deserializing request!", which blames the server for the client's bytes.
Here the parse error is handed to the method instead, which answers INVALID_ARGUMENT with
protobuf's own account of what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from tandem.proto.v1 import admin_pb2 as apb
from tandem.proto.v1 import tandem_pb2 as pb


@dataclass(frozen=True)
class Unparsable:
    """What arrived instead of a message that would not parse."""

    type_name: str
    error: str

    def describe(self) -> str:
        return f"request: not a valid {self.type_name}: {self.error}"


def lenient(message: type[Message]) -> Callable[[bytes], Message | Unparsable]:
    def parse(raw: bytes) -> Message | Unparsable:
        try:
            return message.FromString(raw)
        except (DecodeError, ValueError) as e:
            return Unparsable(message.DESCRIPTOR.full_name, str(e))

    return parse


async def reject_unparsable(request: object, context: grpc.aio.ServicerContext) -> None:
    """Abort the call with INVALID_ARGUMENT if its request did not parse."""
    if isinstance(request, Unparsable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())


def add_tandem_service(servicer: object, server: grpc.aio.Server) -> None:
    """Register `tandem.v1.Tandem` like the generated `add_TandemServicer_to_server`, but with
    lenient request parsing."""
    _add_service(pb, "Tandem", servicer, server)


def add_admin_service(servicer: object, server: grpc.aio.Server) -> None:
    """Register `tandem.v1.Admin` the same way."""
    _add_service(apb, "Admin", servicer, server)


def _add_service(module: Any, name: str, servicer: object, server: grpc.aio.Server) -> None:
    service = module.DESCRIPTOR.services_by_name[name]
    handlers = {}
    for method in service.methods:
        request = getattr(module, method.input_type.name)
        response = getattr(module, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming \
            else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name),
                                     request_deserializer=lenient(request),
                                     response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
