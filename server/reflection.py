"""Server reflection as `grpc.reflection.v1` and `grpc.reflection.v1alpha`.

grpcio-reflection ships only the v1alpha service, while newer tools (grpcurl,
Postman, grpcui) ask v1 first. The two protocols are the same messages under
another package name, so the v1 service here is the v1alpha servicer answering
on v1's method path: the bytes on the wire are identical. The v1 file is also
added to the descriptor pool, so `describe grpc.reflection.v1.ServerReflection`
works like any other service.
"""

from __future__ import annotations

from typing import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_SERVICE = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def _register_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Add grpc/reflection/v1/reflection.proto to `pool` (the v1alpha file under the v1 package)."""
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old = proto.package
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(f".{old}."):
                field.type_name = f".{V1_PACKAGE}." + field.type_name[len(old) + 2:]
    for service in proto.service:
        for method in service.method:
            for attr in ("input_type", "output_type"):
                name = getattr(method, attr)
                if name.startswith(f".{old}."):
                    setattr(method, attr, f".{V1_PACKAGE}." + name[len(old) + 2:])
    proto.options.Clear()
    pool.Add(proto)


def enable_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serve reflection for `service_names` (both reflection services are listed too) as v1 and v1alpha."""
    _register_v1_descriptor(descriptor_pool.Default())
    names = tuple(service_names) + (V1_SERVICE, V1ALPHA_SERVICE)
    servicer = reflection.ReflectionServicer(names)
    reflection.enable_server_reflection(names, server)  # v1alpha, grpcio-reflection's own
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": handler}),))
