"""The one function that builds the scoring server, for production and tests alike."""

from __future__ import annotations

import logging
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dataselect.engine import resolve_device
from dataselect.errors import DataselectError
from dataselect.server.interceptors import ErrorMappingInterceptor
from dataselect.server.service import SelectionServicer
from dataselect.server.sessions import SessionStore
from dataselect.v1 import selection_pb2 as pb

log = logging.getLogger("dataselect.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Selection"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20


class AddressInUse(DataselectError):
    """The server could not bind its address (port taken or host not local)."""


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options for the message-size limit (the same on both ends)."""
    return [
        ("grpc.max_send_message_length", int(max_message_bytes)),
        ("grpc.max_receive_message_length", int(max_message_bytes)),
    ]


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@dataclass
class RunningServer:
    server: grpc.Server
    host: str
    port: int
    device: torch.device
    servicer: SelectionServicer
    store: SessionStore
    health: health.HealthServicer

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


@contextmanager
def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    device: str | torch.device = "cpu",
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    workers: int = 8,
    micro_batch: int = 1024,
    max_sessions: int = 64,
    grace_seconds: float = 5.0,
) -> Iterator[RunningServer]:
    """Start the scoring server and yield it; on exit, stop it with a grace period.

    `port=0` binds a free port (read it from `.port`). Raises
    `dataselect.errors.InvalidArgument` for an unusable device and
    `AddressInUse` when the address cannot be bound.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    store = SessionStore(max_sessions=max_sessions)
    servicer = SelectionServicer(store, device=dev, max_message_bytes=max_message_bytes, micro_batch=micro_batch)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dataselect-rpc"),
        interceptors=[ErrorMappingInterceptor()],
        # Without so_reuseport=0 a second server could silently share a port already in use.
        options=message_size_options(max_message_bytes) + [("grpc.so_reuseport", 0)],
    )
    from dataselect.v1 import selection_pb2_grpc as pb_grpc

    pb_grpc.add_SelectionServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = format_address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        server.stop(None)
        raise AddressInUse(f"cannot listen on {address}: the port is in use or the host is not local; "
                           "pick another --port (0 picks a free one) or --host")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(server=server, host=host, port=bound, device=dev, servicer=servicer,
                            store=store, health=health_servicer)
    try:
        yield running
    finally:
        # Health goes NOT_SERVING first so load balancers stop sending new work.
        health_servicer.enter_graceful_shutdown()
        server.stop(grace_seconds).wait()
        store.close_all()
