"""The generated stubs in tandem/proto match the .proto sources (run `make proto` if not)."""

from __future__ import annotations

import importlib.util

import pytest
from google.protobuf import descriptor_pb2

from tandem.proto import generate
from tandem.proto.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    kv_transfer_pb2,
    kv_transfer_pb2_grpc,
    tandem_pb2,
    tandem_pb2_grpc,
)

if importlib.util.find_spec("grpc_tools") is None:  # not imported: see generate.protoc
    pytest.skip("grpcio-tools is not installed", allow_module_level=True)

MODULES = {"tandem/v1/tandem.proto": (tandem_pb2, tandem_pb2_grpc),
           "tandem/v1/kv_transfer.proto": (kv_transfer_pb2, kv_transfer_pb2_grpc),
           "tandem/v1/admin.proto": (admin_pb2, admin_pb2_grpc)}


def test_every_proto_file_has_stubs():
    assert {str(p.relative_to(generate.PROTO_ROOT)) for p in generate.proto_files()} == set(MODULES)


def test_stubs_match_the_proto_sources():
    compiled = descriptor_pb2.FileDescriptorSet.FromString(generate.descriptor_set())
    sources = {f.name: _without_json_names(f) for f in compiled.file}
    for name, (messages, _) in MODULES.items():
        committed = descriptor_pb2.FileDescriptorProto.FromString(
            messages.DESCRIPTOR.serialized_pb)
        assert committed == sources[name], f"{name} changed: run `make proto`"


def test_grpc_stubs_cover_every_rpc():
    for messages, services in MODULES.values():
        for service in messages.DESCRIPTOR.services_by_name.values():
            servicer = getattr(services, f"{service.name}Servicer")
            for method in service.methods:
                assert hasattr(servicer, method.name), f"{service.name}.{method.name}: make proto"


def _without_json_names(file: descriptor_pb2.FileDescriptorProto):
    """protoc fills in derived json_name fields that the embedded descriptors leave out."""
    def strip(messages):
        for message in messages:
            for field in message.field:
                field.ClearField("json_name")
            strip(message.nested_type)

    strip(file.message_type)
    return file
