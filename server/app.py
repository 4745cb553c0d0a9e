"""The one function that builds the scoring server, for production and tests alike."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dataselect import registry
from dataselect.engine import parse_micro_batch, resolve_channels_last, resolve_device, resolve_precision
from dataselect.errors import DataselectError, InvalidArgument
from dataselect.names import DEFAULT_MAX_MESSAGE_BYTES, message_size_options
from dataselect.server.auth import AuthInterceptor, read_tokens
from dataselect.server.interceptors import DEFAULT_STREAM_IDLE_SECONDS, ErrorMappingInterceptor, InFlightLimit
from dataselect.server.reflection import enable_reflection
from dataselect.server.service import SelectionServicer
from dataselect.server.sessions import DEFAULT_TTL_SECONDS, SessionStore, tune_malloc
from dataselect.v1 import selection_pb2 as pb
from dataselect.v1 import selection_pb2_grpc as pb_grpc

log = logging.getLogger("dataselect.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Selection"].full_name
DEFAULT_MAX_QUEUE = 64
#: Threads beyond the in-flight limit, so health checks and rejections never wait for a thread.
SPARE_THREADS = 4
#: Model state one session may hold by default (--session-memory-mb).
DEFAULT_SESSION_MEMORY = 2 * 2**30
#: After the grace period: how long cancelled calls get to notice, and busy sessions to close.
STOP_SECONDS = 0.5


def default_memory_budget() -> int | None:
    """Half of this machine's physical memory (None where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return None


class AddressInUse(DataselectError):
    """The server could not bind its address (port taken or host not local)."""


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def address_problem(host: str, port: int) -> str | None:
    """Why `host:port` cannot be bound (None: it can), found with a plain socket before grpc tries,
    so a taken port gives one clear error instead of grpc's own log line first."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        return f"cannot resolve host {host!r} ({exc})"
    failures = []
    for family, socktype, proto, _, addr in infos:
        try:
            with socket.socket(family, socktype, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is no conflict
                sock.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "the port is in use"
            failures.append(exc)
    if failures and len(failures) == len(infos):
        return f"the host is not local ({failures[0].strerror or failures[0]})"
    return None


def _read_pem(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror or exc}") from None


@dataclass
class RunningServer:
    server: grpc.Server
    host: str
    port: int
    device: torch.device
    servicer: SelectionServicer
    store: SessionStore
    health: health.HealthServicer
    tls: bool = False
    #: The Selection calls in flight (`in_flight`) and the drain on stop.
    limit: InFlightLimit | None = None

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
    micro_batch: int | str = "auto",
    max_sessions: int = 64,
    grace_seconds: float = 5.0,
    max_queue: int = DEFAULT_MAX_QUEUE,
    session_ttl: float = DEFAULT_TTL_SECONDS,
    tokens: Sequence[str] = (),
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    precision: str = "auto",
    channels_last: bool | str | None = "auto",
    compile: bool = False,
    stream_idle_seconds: float | None = DEFAULT_STREAM_IDLE_SECONDS,
    memory_budget: int | str | None = "auto",
    session_memory: int | None = DEFAULT_SESSION_MEMORY,
    trim_memory: bool = True,
) -> Iterator[RunningServer]:
    """Start the scoring server and yield it; on exit, stop it with a grace period.

    `port=0` binds a free port (read it from `.port`). `workers` calls score at
    once (the device is shared by that many); up to `max_queue` more wait for a
    slot, and calls beyond that are answered RESOURCE_EXHAUSTED at once.
    Sessions idle for `session_ttl` seconds are closed. With `tokens`, every
    call but health checks needs `authorization: Bearer <token>`; with
    `tls_cert`/`tls_key` (PEM files) the port speaks TLS; `checkpoint_dir` is
    the one directory CheckpointChunk.path may name. `micro_batch` ('auto':
    sized from free CUDA memory), `precision` (auto|fp32|bf16|fp16 for forward
    signals), `channels_last` (auto|on|off) and `compile` are the scoring
    engine's options for every session (`dataselect.engine`).

    Hostile or stalled clients: a client stream silent for `stream_idle_seconds`
    is ended (DEADLINE_EXCEEDED); `session_memory` bounds one session's model
    state and `memory_budget` that of all sessions together ("auto": half of the
    physical memory; None: no bound), in bytes; with `trim_memory`, freed memory
    goes back to the OS after sessions close.

    Stopping: health turns NOT_SERVING and new calls are refused (UNAVAILABLE)
    while the calls in flight get `grace_seconds` to finish; the rest are then
    cancelled, and the server is down within about a second more.

    Raises `dataselect.errors.InvalidArgument` for an unusable device or setting and
    `AddressInUse` when the address cannot be bound.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if workers < 1 or max_queue < 0 or session_ttl <= 0:
        raise InvalidArgument(f"need workers >= 1, max_queue >= 0 and session_ttl > 0; got {workers}, {max_queue}, {session_ttl}")
    if stream_idle_seconds is not None and not stream_idle_seconds > 0:
        raise InvalidArgument(f"stream_idle_seconds must be > 0 (None: no limit), got {stream_idle_seconds}")
    if memory_budget == "auto":
        memory_budget = default_memory_budget()
    if (tls_cert is None) != (tls_key is None):
        raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
    if checkpoint_dir is not None and not Path(checkpoint_dir).is_dir():
        raise InvalidArgument(f"--checkpoint-dir {checkpoint_dir} is not a directory")
    micro_batch = parse_micro_batch(micro_batch)
    resolve_precision(precision, dev)  # refuse a bad value now, not at the first OpenSession
    resolve_channels_last(channels_last, dev)
    tokens = [t for t in tokens if t]
    if not is_loopback(host) and not tokens:
        log.warning("listening on %s without a token: anyone who can reach this address can use the server; "
                    "pass --token-file (or set DATASELECT_TOKEN)%s", host,
                    "" if tls_cert else " and --tls-cert/--tls-key")
    store = SessionStore(max_sessions=max_sessions, ttl=session_ttl, memory_budget=memory_budget,
                         session_memory=session_memory, trim_memory=trim_memory)
    servicer = SelectionServicer(store, device=dev, max_message_bytes=max_message_bytes, micro_batch=micro_batch,
                                 scoring_slots=workers, checkpoint_dir=checkpoint_dir, authenticated=bool(tokens),
                                 precision=precision, channels_last=channels_last, compile=compile)
    in_flight = workers + max_queue
    limit = InFlightLimit(in_flight)
    interceptors = ([AuthInterceptor(tokens)] if tokens else []) + [
        ErrorMappingInterceptor(limit, stream_idle_seconds=stream_idle_seconds)]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=in_flight + SPARE_THREADS, thread_name_prefix="dataselect-rpc"),
        interceptors=interceptors,
        # Without so_reuseport=0 a second server could silently share a port already in use.
        options=message_size_options(max_message_bytes) + [("grpc.so_reuseport", 0)],
        # Backstop against floods of calls waiting for a thread (health checks included).
        maximum_concurrent_rpcs=2 * (in_flight + SPARE_THREADS),
    )
    pb_grpc.add_SelectionServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    address = format_address(host, port)
    problem = address_problem(host, port)
    if problem is not None:
        server.stop(None)
        raise AddressInUse(f"cannot listen on {address}: {problem}; pick another --port (0 picks a free one) or --host")
    try:
        if tls_cert is not None:
            creds = grpc.ssl_server_credentials([(_read_pem(tls_key, "--tls-key"), _read_pem(tls_cert, "--tls-cert"))])
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        server.stop(None)
        raise AddressInUse(f"cannot listen on {address}: the port is in use or the host is not local; "
                           "pick another --port (0 picks a free one) or --host")
    server.start()
    store.start_reaper()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(server=server, host=host, port=bound, device=dev, servicer=servicer,
                            store=store, health=health_servicer, tls=tls_cert is not None, limit=limit)
    try:
        yield running
    finally:
        stop(running, limit, grace_seconds)


def stop(running: RunningServer, limit: InFlightLimit, grace_seconds: float) -> None:
    """Drain, then stop: within `grace_seconds` plus about `STOP_SECONDS`.

    Health goes NOT_SERVING first and stays answerable while the calls in flight
    finish, so load balancers and `grpc_health_probe` see the drain; new Selection
    calls get UNAVAILABLE meanwhile. Calls still running when the grace period
    ends are cancelled, and scoring stops at its next micro-batch.
    """
    t0 = time.monotonic()
    running.health.enter_graceful_shutdown()
    drained = limit.drain(max(0.0, float(grace_seconds)))
    if not drained:
        log.warning("%d call(s) still running after the %gs grace period: cancelling them",
                    limit.in_flight, grace_seconds)
    running.servicer.stopping.set()
    running.server.stop(0).wait(STOP_SECONDS)
    busy = running.store.close_all(timeout=STOP_SECONDS / 2)
    if busy:
        log.warning("%d session(s) still busy at shutdown; they close when their calls stop", busy)
    log.info("stopped in %.1fs", time.monotonic() - t0)


def run_until_stopped(*, host, port, device, max_message_mb, micro_batch, precision, channels_last, compile_model,
                      threads, workers, grace_seconds, max_queue, max_sessions, session_ttl, token_file, tls_cert,
                      tls_key, checkpoint_dir, stream_idle_seconds, session_memory_mb, memory_budget_mb,
                      malloc_arena_max, malloc_mmap_threshold_kb, trim_memory, log_level) -> None:
    """`dataselect-server`'s body, given its parsed options (`dataselect.server.cli`): serve until SIGTERM
    or Ctrl-C, then drain. A bad option value exits with status 2 and a message naming the option."""
    tune_malloc(malloc_arena_max, malloc_mmap_threshold_kb * 1024)  # before the RPC threads start allocating

    try:
        dev = resolve_device(device)
    except DataselectError as exc:
        _exit_with_error(f"--device: {exc}")
    try:
        resolve_precision(precision, dev)
    except DataselectError as exc:
        _exit_with_error(f"--precision: {exc}")
    if threads is not None:
        torch.set_num_threads(threads)

    try:
        tokens = read_tokens(token_file)
    except DataselectError as exc:
        _exit_with_error(f"--token-file: {exc}")

    stopping = threading.Event()

    def request_stop(signum, frame):
        log.info("received %s, stopping (grace %.0fs)", signal.Signals(signum).name, grace_seconds)
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        with serve(host, port, device=dev, max_message_bytes=max_message_mb * 2**20, workers=workers,
                   micro_batch=micro_batch, grace_seconds=grace_seconds, max_queue=max_queue,
                   max_sessions=max_sessions, session_ttl=session_ttl, tokens=tokens, tls_cert=tls_cert,
                   tls_key=tls_key, checkpoint_dir=checkpoint_dir, precision=precision.lower(),
                   channels_last=channels_last, compile=compile_model, stream_idle_seconds=stream_idle_seconds,
                   session_memory=session_memory_mb * 2**20,
                   memory_budget="auto" if memory_budget_mb is None else memory_budget_mb * 2**20,
                   trim_memory=trim_memory) as running:
            log.info("dataselect-server listening on %s (%s, %s), device %s, strategies: %s",
                     running.address, "TLS" if running.tls else "plaintext",
                     "token required" if tokens else "no token", running.device, ", ".join(registry.strategies()))
            log.info("scoring engine: micro-batch %s, precision %s, channels-last %s, compile %s",
                     micro_batch, precision, channels_last, "on" if compile_model else "off")
            print(f"listening on {running.address}", flush=True)
            # Event.wait with a timeout keeps the main thread responsive to signals.
            while not stopping.wait(0.5):
                pass
    except AddressInUse as exc:
        _exit_with_error(f"--port {port}: {exc}")
    except DataselectError as exc:
        _exit_with_error(str(exc))
    log.info("stopped")
    _exit_now_if_stuck(running.limit.in_flight if running.limit is not None else 0)


def _exit_now_if_stuck(calls: int) -> None:
    """Exit at once when calls are still stuck past the grace period (e.g. inside a plugin that ignores
    cancellation): Python would otherwise wait for their worker threads before exiting."""
    if not calls:
        return
    log.warning("exiting with %d call(s) still running past the grace period", calls)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _exit_with_error(message: str) -> None:
    sys.stderr.write(f"dataselect-server: error: {message}\n")
    sys.exit(2)
