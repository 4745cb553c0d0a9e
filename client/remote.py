"""`RemoteScorer`: the `Scorer` interface over gRPC to `dataselect-server`.

The twin of `dataselect.client.scorer.EmbeddedScorer`: same calls, same
results for the same seed and weights, with the scoring done by the server's
`ScoringSession`. Every call carries a deadline; status codes come back as
the `dataselect.errors` class the server raised.

Surviving a server restart: when a call finds the server UNAVAILABLE (or the
server no longer knows the session: it restarted or the session expired), the
scorer retries with exponential backoff for up to `retry_seconds`, reopens its
session, re-uploads the last checkpoint it pushed and repeats the call; each
such recovery counts in `counters.reconnects`. Server-side per-sample strategy
state (loss histories and the like) starts afresh with the new session.
With `on_server_failure="fallback"`, a server that stays unreachable for the
whole retry budget is replaced by an in-process `EmbeddedScorer` for the rest
of the run (one warning; `counters.extra["fallback"] == 1`).

Authentication and TLS: `token` (or `token_file`, or env DATASELECT_TOKEN) is
sent as `authorization: Bearer <token>` with every call; `tls_ca` (a PEM file
of the CA that signed the server's certificate) makes the channel TLS.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import grpc
import torch
from torch import nn

from dataselect import codec
from dataselect.checkpoint import CHECKPOINT_DTYPES, FORMAT, to_bytes
from dataselect.client.scorer import EmbeddedScorer, ScoreReply, ScorerCounters, SessionInfo, SessionSpec
from dataselect.errors import DataselectError, FailedPrecondition, InvalidArgument, NotFound
from dataselect.names import DEFAULT_MAX_MESSAGE_BYTES, ON_SERVER_FAILURE, SLIM_PROXY, message_size_options
from dataselect.status import error_for
from dataselect.strategy import AuxiliaryLoss, Progress
from dataselect.v1 import selection_pb2 as pb
from dataselect.v1 import selection_pb2_grpc as pb_grpc

CHECKPOINT_CHUNK_BYTES = 2**20
TOKEN_ENV = "DATASELECT_TOKEN"

log = logging.getLogger("dataselect.client")
T = TypeVar("T")

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


#: grpc target forms passed through as they are (a Unix socket, an explicit resolver).
GRPC_TARGET_PREFIXES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:")


def address_error(entry: str) -> str | None:
    """Why `entry` is not a usable HOST:PORT (None when it is), with the likely fix."""
    if entry.startswith(GRPC_TARGET_PREFIXES):
        return None
    if "://" in entry:
        scheme, _, rest = entry.partition("://")
        return (f"{entry!r} is a URL; give HOST:PORT without the scheme {scheme + '://'!r}, "
                f"e.g. {rest.rstrip('/') or '127.0.0.1:50051'}")
    m = _HOST_PORT.match(entry)
    if m is None:
        if ":" not in entry:
            digits = re.match(r"^(.*?[^\d])(\d{2,5})$", entry)
            hint = f"; did you mean {digits.group(1)}:{digits.group(2)}?" if digits else ""
            return f"{entry!r} has no port: give HOST:PORT, e.g. 127.0.0.1:50051{hint}"
        return f"{entry!r} is not HOST:PORT (port 1-65535)"
    if not 1 <= int(m.group(2)) <= 65535:
        return f"{entry!r} is not HOST:PORT (port 1-65535)"
    return None


def check_address(address: str) -> str:
    """`address` if it is one usable HOST:PORT, else InvalidArgument saying how to write it (no network)."""
    address = str(address).strip()
    if "," in address:
        raise InvalidArgument(f"{address!r} names several servers; one scorer talks to one HOST:PORT "
                              "(the trainer's --server host1:50051,host2:50051 spreads pools over replicas)")
    problem = address_error(address) if address else "the address is empty"
    if problem is not None:
        raise InvalidArgument(f"--server: {problem}")
    return address

def auxiliary_loss_from_reply(resp: pb.OpenSessionResponse) -> AuxiliaryLoss | None:
    """The loss term an OpenSession reply asks for; a 0.1 server's `proxy` is the slim proxy's."""
    if resp.HasField("auxiliary_loss"):
        aux = resp.auxiliary_loss
        return AuxiliaryLoss(aux.name, aux.weight, json.loads(aux.params_json or "{}"))
    if resp.HasField("proxy"):
        return AuxiliaryLoss(SLIM_PROXY, resp.proxy.loss_weight, {"width_ratio": resp.proxy.width_ratio})
    return None

class ServerUnavailable(DataselectError):
    """The scoring server cannot be reached or did not answer in time."""


class _Unreachable(ServerUnavailable):
    """UNAVAILABLE: the server is down or restarting (worth reconnecting; a slow server is not)."""


def read_token_file(path: str | Path) -> str:
    """The first token in a token file (one per line, '#' comments allowed)."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise InvalidArgument(f"cannot read token file {p}: {exc.strerror or exc}") from None
    for line in lines:
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    raise InvalidArgument(f"token file {p} holds no token")


def _port_of(address: str) -> str:
    return address.rsplit(":", 1)[-1] if ":" in address else "50051"


def _progress_msg(progress: Progress | None) -> pb.Progress:
    p = progress or Progress()
    return pb.Progress(epoch=p.epoch, step=p.step, total_epochs=p.total_epochs, fraction=p.fraction)


class RemoteScorer:
    """A scoring session on a remote `dataselect-server`.

    Args:
        address: "HOST:PORT" of the server.
        spec: the session to open.
        timeout: deadline in seconds for each call (scoring a large pool can take a while).
        connect_timeout: how long to wait for the server to become reachable.
        max_message_bytes: must not exceed the server's `--max-message-mb`; pools
            larger than half of it are sent with SelectStream in pieces.
        chunk_bytes: size of the checkpoint upload chunks.
        checkpoint_dtype: "float32" (exact), "float16" or "bfloat16": floating weights travel in
            this dtype (half the bytes); the server scores with them converted back to float32.
        checkpoint_delta: push only the tensors that changed since the previous push (frozen
            layers and unchanged buffers stay on the server); a server without the base
            version is sent a full checkpoint.
    """

    def __init__(self, address: str, spec: SessionSpec, *, timeout: float = 120.0, connect_timeout: float = 10.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, chunk_bytes: int = CHECKPOINT_CHUNK_BYTES,
                 token: str | None = None, token_file: str | Path | None = None, tls_ca: str | Path | None = None,
                 retry_seconds: float = 60.0, on_server_failure: str = "retry",
                 fallback_device: str | torch.device = "cpu", checkpoint_dtype: str = "float32",
                 checkpoint_delta: bool = False):
        if on_server_failure not in ON_SERVER_FAILURE:
            raise InvalidArgument(f"on_server_failure must be one of {', '.join(ON_SERVER_FAILURE)}, got {on_server_failure!r}")
        address = check_address(address)  # a malformed address fails now, not after the connect timeout
        self.address = address
        self.spec = spec
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.max_message_bytes = int(max_message_bytes)
        # A chunk must fit in one message whatever limit the caller chose.
        self.chunk_bytes = max(1, min(int(chunk_bytes), self.max_message_bytes // 2))
        self.retry_seconds = float(retry_seconds)
        self.on_server_failure = on_server_failure
        self.fallback_device = fallback_device
        self.counters = ScorerCounters()
        self._closed = False
        self._fallback: EmbeddedScorer | None = None
        #: When the current outage began (monotonic seconds; None while the server answers).
        self._lost_since: float | None = None
        if checkpoint_dtype not in CHECKPOINT_DTYPES:
            raise InvalidArgument(f"checkpoint_dtype must be one of {', '.join(CHECKPOINT_DTYPES)}, got {checkpoint_dtype!r}")
        self.checkpoint_dtype = checkpoint_dtype
        self.checkpoint_delta = bool(checkpoint_delta)
        # The weights as the server last received them (CPU, wire dtype) and their version:
        # the base of the next delta, and what a reconnect or a fallback reloads.
        self._shadow: tuple[dict[str, torch.Tensor], int] | None = None
        #: The irreducible-loss model as last pushed (wire form), re-sent to a new session.
        self._irreducible: dict[str, torch.Tensor] | None = None
        if token is None and token_file is not None:
            token = read_token_file(token_file)
        if token is None:
            token = os.environ.get(TOKEN_ENV, "").strip() or None
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = message_size_options(self.max_message_bytes) + [
            # Notice a restarted server within about a second, not grpc's default of up to 2 minutes.
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000)]
        self._resources = contextlib.ExitStack()
        if tls_ca is not None:
            try:
                ca = Path(tls_ca).read_bytes()
            except OSError as exc:
                raise InvalidArgument(f"cannot read tls_ca {tls_ca}: {exc.strerror or exc}") from None
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca), options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        self._channel = self._resources.enter_context(channel)
        self._stub = pb_grpc.SelectionStub(self._channel)
        try:
            try:
                grpc.channel_ready_future(self._channel).result(timeout=connect_timeout)
            except grpc.FutureTimeoutError:
                raise _Unreachable(self._unreachable()) from None
            self.info = self._open()
        except ServerUnavailable as exc:
            if on_server_failure != "fallback":
                self._resources.close()
                self._closed = True
                raise
            self._switch_to_fallback(exc)
        except BaseException:
            self._resources.close()
            self._closed = True
            raise

    def _open(self) -> SessionInfo:
        spec = self.spec
        try:
            resp = self._call(self._stub.OpenSession, pb.OpenSessionRequest(
                strategy=spec.strategy, options_json=json.dumps(spec.options or {}),
                model=pb.ModelSpec(name=spec.model_name, kwargs_json=json.dumps(spec.model_kwargs),
                                   exported=spec.exported or b""),
                seed=spec.seed, num_classes=spec.num_classes, dataset=spec.dataset,
                dataset_size=spec.dataset_size, policy=spec.policy, input_scale=spec.input_scale,
            ))
        except InvalidArgument as exc:
            raise self._missing_on_server(exc) from None
        return SessionInfo(
            session_id=resp.session_id, strategy=resp.strategy,
            resolved_options=json.loads(resp.resolved_options_json or "{}"), default_mode=resp.default_mode,
            policy=resp.policy, device=resp.device, signals=list(resp.signals), uses_reports=resp.uses_reports,
            auxiliary_loss=auxiliary_loss_from_reply(resp),
        )

    def _missing_on_server(self, exc: InvalidArgument) -> InvalidArgument:
        """OpenSession refused: when the *server* lacks the strategy or model (a plugin installed on this
        side only, so `dataselect strategies` here lists it), say so and what the server has."""
        text = str(exc)
        if not text.startswith(("unknown strategy", "unknown model")):
            return exc
        try:
            info = self._stub.Describe(pb.DescribeRequest(), timeout=min(self.timeout, 10.0), metadata=self._metadata)
        except grpc.RpcError:
            return exc
        strategies = [s.name for s in info.strategies]
        if self.spec.strategy not in strategies:
            kind, name, has, listing = "strategy", self.spec.strategy, strategies, "strategies"
        elif self.spec.model_name not in info.models:
            kind, name, has, listing = "model", self.spec.model_name, list(info.models), "models"
        else:
            return exc
        return InvalidArgument(
            f"the scoring server at {self.address} has no {kind} {name!r} (it has: {', '.join(has)}); a {kind} "
            f"listed by `dataselect {listing}` here comes from a plugin installed on this machine, which the server "
            f"lacks: install that plugin where dataselect-server runs and restart it, or pick one the server has")

    @property
    def fallen_back(self) -> bool:
        """True once scoring runs in-process because the server could not be reached."""
        return self._fallback is not None

    # -- the Scorer interface -----------------------------------------------------------
    def push_checkpoint(self, model: nn.Module, version: int, step: int) -> None:
        self.push_state(model.state_dict(), version, step)

    def push_state(self, state: dict[str, torch.Tensor], version: int, step: int) -> None:
        """Upload the weights, as `checkpoint_dtype` and (with `checkpoint_delta`) only the tensors
        that changed since the last push; a server that lost the base version gets a full one."""
        wire = self._wire_state(state)
        if self._fallback is not None:
            self._fallback.push_state(wire, version, step)
            self._shadow = (wire, int(version))
            self.counters.checkpoint_pushes += 1
            return
        delta_of = None
        sent = wire
        if self.checkpoint_delta and self._shadow is not None:
            base, base_version = self._shadow
            sent = {k: v for k, v in wire.items() if k not in base or not torch.equal(base[k], v)}
            delta_of = base_version
        self._shadow = (wire, int(version))
        data = self._checkpoint_bytes(sent, version, step, delta_of)
        try:
            result = self._resilient(lambda: self._upload(data, version), uploads_checkpoint=True)
        except FailedPrecondition:
            if delta_of is None:
                raise
            # The server does not hold the delta's base (e.g. a replica that restarted): send everything.
            data = self._checkpoint_bytes(wire, version, step, None)
            result = self._resilient(lambda: self._upload(data, version), uploads_checkpoint=True)
        self.counters.checkpoint_pushes += 1
        if result is not _FELL_BACK:
            self.counters.checkpoint_bytes += len(data)

    def push_irreducible(self, state: dict[str, torch.Tensor]) -> None:
        """Upload the irreducible-loss model (a checkpoint with role 'irreducible'); kept, so a new session
        after a reconnect, or an in-process fallback, gets it again."""
        wire = self._wire_state(state)
        self._irreducible = wire
        if self._fallback is not None:
            self._fallback.push_irreducible(wire)
            return
        data = self._checkpoint_bytes(wire, 0, 0, None, role="irreducible")
        result = self._resilient(lambda: self._upload(data, 0), uploads_irreducible=True)
        if result is not _FELL_BACK:
            self.counters.checkpoint_bytes += len(data)

    def _wire_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CPU copies of the tensors as they travel: floating tensors in `checkpoint_dtype`."""
        dtype = CHECKPOINT_DTYPES[self.checkpoint_dtype]
        out = {}
        for k, v in state.items():
            t = v.detach()
            t = t.to("cpu", dtype) if t.is_floating_point() and t.dtype != dtype else t.to("cpu", copy=True)
            out[k] = t
        return out

    def _checkpoint_bytes(self, state: dict[str, torch.Tensor], version: int, step: int,
                          delta_of: int | None, *, role: str = "model") -> bytes:
        ckpt = {"format": FORMAT, "model": self.spec.model_name, "kwargs": dict(self.spec.model_kwargs),
                "state_dict": state, "version": int(version), "step": int(step)}
        if role != "model":
            ckpt["role"] = role
        if delta_of is not None:
            ckpt["delta_of"] = int(delta_of)
        return to_bytes(ckpt)

    def _upload(self, data: bytes, version: int) -> None:
        def chunks() -> Iterator[pb.CheckpointChunk]:
            yield pb.CheckpointChunk(session_id=self.info.session_id, version=version, total_bytes=len(data),
                                     data=data[:self.chunk_bytes])
            for start in range(self.chunk_bytes, len(data), self.chunk_bytes):
                yield pb.CheckpointChunk(data=data[start:start + self.chunk_bytes])

        self._call(self._stub.UploadCheckpoint, chunks())

    def select(self, ids: torch.Tensor, inputs: torch.Tensor | None, labels: torch.Tensor, budget: int,
               progress: Progress, *, return_scores: bool = False) -> ScoreReply:
        if self._fallback is None:
            reply = self._resilient(lambda: self._select(ids, inputs, labels, budget, progress, return_scores))
            if reply is not _FELL_BACK:
                return reply
        return self._fallback.select(ids, inputs, labels, budget, progress, return_scores=return_scores)

    def _select(self, ids, inputs, labels, budget, progress, return_scores) -> ScoreReply:
        t0 = time.perf_counter()
        # Strategies without signals never look at the images: do not ship them.
        send_inputs = inputs if self.info.signals else None
        header = dict(session_id=self.info.session_id, budget=int(budget), progress=_progress_msg(progress),
                      return_scores=return_scores)
        pool_bytes = ids.numel() * 8 + labels.numel() * 8 + (0 if send_inputs is None else
                                                              send_inputs.numel() * send_inputs.element_size())
        if pool_bytes <= self.max_message_bytes // 2:
            resp = self._call(self._stub.Select, pb.SelectRequest(**header, **self._pool(ids, send_inputs, labels)))
        else:
            resp = self._call(self._stub.SelectStream, self._stream(header, ids, send_inputs, labels, pool_bytes))
        selected = codec.decode(resp.selected_ids, name="selected_ids").clone()
        weights = codec.decode(resp.weights, name="weights").clone() if codec.is_set(resp.weights) else None
        scores = codec.decode(resp.scores, name="scores").clone() if codec.is_set(resp.scores) else None
        wall = time.perf_counter() - t0
        compute = resp.cost.compute_seconds
        return ScoreReply(selected_ids=selected, weights=weights, scores=scores,
                          checkpoint_version=resp.checkpoint_version, server_compute_seconds=compute,
                          samples_scored=resp.cost.samples_scored, transfer_seconds=max(0.0, wall - compute),
                          diagnostics=json.loads(resp.diagnostics_json) if resp.diagnostics_json else {})

    def report(self, ids: torch.Tensor, losses: torch.Tensor, true_class_probs: torch.Tensor | None,
               correct: torch.Tensor | None, progress: Progress) -> None:
        if self._fallback is None:
            def send():
                req = pb.ReportRequest(session_id=self.info.session_id, ids=codec.encode(ids.long()),
                                       losses=codec.encode(losses.float()), progress=_progress_msg(progress))
                if true_class_probs is not None:
                    req.true_class_probs.CopyFrom(codec.encode(true_class_probs.float()))
                if correct is not None:
                    req.correct.CopyFrom(codec.encode(correct.bool()))
                self._call(self._stub.Report, req)

            if self._resilient(send) is not _FELL_BACK:
                return
        self._fallback.report(ids, losses, true_class_probs, correct, progress)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._fallback is not None:
            self._fallback.close()
        try:
            # Best effort: the server may already be gone, and then the session is gone with it.
            if self._fallback is None:
                self._stub.CloseSession(pb.CloseSessionRequest(session_id=self.info.session_id),
                                        timeout=min(self.timeout, 5.0), metadata=self._metadata)
        except grpc.RpcError:
            pass
        finally:
            self._resources.close()

    def __enter__(self) -> "RemoteScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- surviving restarts ------------------------------------------------------------
    def _resilient(self, op: Callable[[], T], *, uploads_checkpoint: bool = False,
                   uploads_irreducible: bool = False) -> T | object:
        """Run `op`; on UNAVAILABLE (or a session the server lost) reconnect with backoff and run it again.

        Returns `_FELL_BACK` when the retry budget ran out and scoring moved in-process.
        """
        if self.retry_seconds <= 0:
            return op()
        delay = 0.1
        lost: DataselectError | None = None
        while True:
            if lost is None:
                try:
                    result = op()
                    self._lost_since = None
                    return result
                except _Unreachable as exc:
                    lost = exc
                except NotFound as exc:
                    # The server restarted between two calls, or the session idled out (--session-ttl).
                    lost = exc
                if self._lost_since is None:
                    self._lost_since = time.monotonic()
            # One budget per outage, shared by every call that meets it (a push, then the Selects
            # queued behind it): the run gives up `retry_seconds` after the server was first lost.
            deadline = self._lost_since + self.retry_seconds
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if self.on_server_failure == "fallback":
                    self._switch_to_fallback(lost)
                    return _FELL_BACK
                raise ServerUnavailable(f"{lost} (gave up reconnecting after {self.retry_seconds:g}s)") from None
            if isinstance(lost, _Unreachable):
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 5.0)
            try:
                self._reconnect(skip_checkpoint=uploads_checkpoint, skip_irreducible=uploads_irreducible,
                                deadline=deadline)
            except (_Unreachable, NotFound) as exc:
                lost = exc
                continue
            lost = None

    def _reconnect(self, *, skip_checkpoint: bool, deadline: float, skip_irreducible: bool = False) -> None:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=max(0.1, min(self.connect_timeout,
                                                                                  deadline - time.monotonic())))
        except grpc.FutureTimeoutError:
            raise _Unreachable(self._unreachable()) from None
        self.info = self._open()
        if self._shadow is not None and not skip_checkpoint:
            # A new session holds no weights: always a full checkpoint, never a delta.
            state, version = self._shadow
            self._upload(self._checkpoint_bytes(state, version, 0, None), version)
        if self._irreducible is not None and not skip_irreducible:
            self._upload(self._checkpoint_bytes(self._irreducible, 0, 0, None, role="irreducible"), 0)
        self.counters.reconnects += 1
        log.warning("reconnected to dataselect-server at %s with a new session (strategy state restarts)",
                    self.address)

    def _switch_to_fallback(self, reason: BaseException | None) -> None:
        log.warning("dataselect-server at %s cannot be reached (%s); scoring in-process for the rest of the run",
                    self.address, reason)
        self._fallback = EmbeddedScorer(self.spec, device=self.fallback_device)
        if self._shadow is not None:
            state, version = self._shadow
            self._fallback.session.load_state_dict(state, version)
        if self._irreducible is not None:
            self._fallback.push_irreducible(self._irreducible)
        self.info = self._fallback.info
        self.counters.extra["fallback"] = 1

    # -- plumbing ---------------------------------------------------------------------
    @staticmethod
    def _pool(ids: torch.Tensor, inputs: torch.Tensor | None, labels: torch.Tensor) -> dict:
        out = {"ids": codec.encode(ids.long()), "labels": codec.encode(labels.long())}
        if inputs is not None:
            out["inputs"] = codec.encode(inputs)
        return out

    def _stream(self, header: dict, ids, inputs, labels, pool_bytes: int) -> Iterator[pb.SelectRequest]:
        n = int(ids.numel())
        per_row = max(1, pool_bytes // max(1, n))
        rows = max(1, (self.max_message_bytes // 4) // per_row)
        yield pb.SelectRequest(**header)
        for start in range(0, n, rows):
            end = start + rows
            yield pb.SelectRequest(**self._pool(ids[start:end], None if inputs is None else inputs[start:end],
                                                labels[start:end]))

    def _call(self, method, request):
        if self._closed:
            raise DataselectError("this RemoteScorer is closed; open a new one")
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _error(self, exc: grpc.RpcError) -> DataselectError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else "") or str(code)
        if code == grpc.StatusCode.UNAVAILABLE:
            return _Unreachable(f"{self._unreachable()} ({details})")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return DataselectError(f"dataselect-server at {self.address} refused the call: {details}; "
                                   "pass the server's token (--token-file or DATASELECT_TOKEN)")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in details:
            details = (f"{details}: a message exceeded the size limit of {self.max_message_bytes} bytes here or the "
                       "server's --max-message-mb; set max_message_bytes to the server's limit (pools larger than "
                       "half of it are streamed)")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and "--stream-idle-seconds" in details:
            return ServerUnavailable(f"dataselect-server at {self.address} ended the call: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ServerUnavailable(f"dataselect-server at {self.address} did not answer within {self.timeout:g}s; "
                                     "raise the scorer timeout or use a faster server device")
        cls = error_for(code) or DataselectError
        return cls(details if cls is not DataselectError else f"dataselect-server: {code.name}: {details}")

    def _unreachable(self) -> str:
        return (f"cannot reach dataselect-server at {self.address}: start it with "
                f"`dataselect-server --port {_port_of(self.address)}` or fix --server")


_FELL_BACK = object()
