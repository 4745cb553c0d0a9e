"""The `dataselect.v1.Selection` servicer: wire messages in, `ScoringSession` calls, wire messages out.

All scoring logic lives in `dataselect.scoring.ScoringSession` (shared with
the trainer's embedded mode); this module only decodes, delegates and
encodes. Errors are raised as `dataselect.errors` exceptions and mapped to
status codes by `dataselect.server.interceptors`.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from dataselect import __version__, codec
from dataselect.checkpoint import from_bytes
from dataselect.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from dataselect.plugins import models, selectors
from dataselect.plugins.base import Progress
from dataselect.scoring import PoolChunk, ScoringSession
from dataselect.server.auth import principal_of
from dataselect.server.sessions import SessionStore
from dataselect.v1 import selection_pb2 as pb
from dataselect.v1 import selection_pb2_grpc as pb_grpc


def parse_json_object(text: str, field: str) -> dict[str, Any]:
    """'' means {}; anything but a JSON object is the caller's mistake."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{field} is not valid JSON ({exc}); send a JSON object such as {{\"key\": 1}}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field} must be a JSON object, got {type(value).__name__}")
    return value


def progress_from(msg: pb.Progress) -> Progress:
    return Progress(epoch=msg.epoch, step=msg.step, total_epochs=msg.total_epochs, fraction=msg.fraction)


class SelectionServicer(pb_grpc.SelectionServicer):
    """Args beyond the obvious:
        scoring_slots: how many calls may score (use the device) at once; the rest wait
            (bounded by the in-flight limit in `interceptors`), and ServerCost.queue_seconds
            reports the wait.
        checkpoint_dir: the one directory CheckpointChunk.path may name (None: paths refused).
        authenticated: sessions belong to the token that opened them.
        micro_batch, precision, channels_last, compile: the scoring engine's options for
            every session (see `dataselect.scoring.ScoringSession`).
    """

    def __init__(self, store: SessionStore, *, device: torch.device, max_message_bytes: int,
                 micro_batch: int | str = "auto", max_checkpoint_bytes: int = 2 * 2**30, scoring_slots: int = 8,
                 checkpoint_dir: str | Path | None = None, authenticated: bool = False,
                 precision: str = "auto", channels_last: bool | str | None = "auto", compile: bool = False):
        self.store = store
        self.device = device
        self.max_message_bytes = max_message_bytes
        self.micro_batch = micro_batch
        self.engine_options = dict(precision=precision, channels_last=channels_last, compile=compile)
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir).resolve()
        self.authenticated = authenticated
        self._slots = threading.BoundedSemaphore(max(1, int(scoring_slots)))

    def _session(self, session_id: str, context) -> ScoringSession:
        return self.store.get(session_id, principal_of(context, self.authenticated))

    @contextmanager
    def _scoring_slot(self):
        """Wait for a scoring slot; yields the seconds waited."""
        t0 = time.perf_counter()
        self._slots.acquire()
        try:
            yield time.perf_counter() - t0
        finally:
            self._slots.release()

    # -- sessions --------------------------------------------------------------------
    def OpenSession(self, request: pb.OpenSessionRequest, context) -> pb.OpenSessionResponse:
        options = parse_json_object(request.options_json, "options_json")
        kwargs = parse_json_object(request.model.kwargs_json, "model.kwargs_json")
        if not request.model.name:
            raise InvalidArgument(f"model.name is empty; known models: {', '.join(models())}")
        session = ScoringSession(
            request.strategy, options, request.model.name, kwargs,
            num_classes=request.num_classes, seed=request.seed, dataset=request.dataset,
            dataset_size=request.dataset_size, policy=request.policy, device=self.device,
            micro_batch=self.micro_batch, input_scale=request.input_scale or 1.0, **self.engine_options,
        )
        # Name the registering plugin too, so a failing third-party strategy is easy to trace.
        plugin = selectors()[request.strategy].plugin
        session.plugin_label = f"strategy {request.strategy!r} (plugin {plugin!r})"
        try:
            session_id = self.store.add(session, principal_of(context, self.authenticated))
        except BaseException:
            session.close()
            raise
        cls = type(session.selector)
        return pb.OpenSessionResponse(
            session_id=session_id, strategy=request.strategy,
            resolved_options_json=json.dumps(session.selector.opts), default_mode=cls.default_mode,
            policy=session.policy, device=str(session.device),
            # The instance's signals: options may change what a strategy needs (e.g. a gradient scope).
            signals=sorted(session.signals),
            uses_reports=cls.uses_reports,
            proxy=None if session.proxy is None else pb.ProxySpec(width_ratio=session.proxy.ratio,
                                                                  loss_weight=session.proxy.loss_weight),
        )

    def CloseSession(self, request: pb.CloseSessionRequest, context) -> pb.CloseSessionResponse:
        self.store.close(request.session_id, principal_of(context, self.authenticated))
        return pb.CloseSessionResponse(closed=True)

    # -- checkpoints -------------------------------------------------------------------
    def UploadCheckpoint(self, request_iterator: Iterator[pb.CheckpointChunk], context) -> pb.UploadCheckpointResponse:
        first = next(request_iterator, None)
        if first is None:
            raise InvalidArgument("UploadCheckpoint received no chunks; the first chunk carries session_id and version")
        session = self._session(first.session_id, context)
        if first.path:
            data = self._read_checkpoint_path(first.path)
            t0 = time.perf_counter()
            with self._scoring_slot():
                session.load_checkpoint(from_bytes(data), first.version)
            return pb.UploadCheckpointResponse(version=first.version, bytes_received=0,
                                               load_seconds=time.perf_counter() - t0)
        if first.total_bytes < 0:
            raise InvalidArgument(f"total_bytes must be >= 0 (0 = not announced), got {first.total_bytes}")
        if first.total_bytes > self.max_checkpoint_bytes:
            raise ResourceExhausted(f"checkpoint of {first.total_bytes} bytes exceeds the server's limit of {self.max_checkpoint_bytes}")
        parts = [first.data]
        received = len(first.data)
        for chunk in request_iterator:
            received += len(chunk.data)
            if received > self.max_checkpoint_bytes:
                raise ResourceExhausted(f"checkpoint exceeds the server's limit of {self.max_checkpoint_bytes} bytes")
            parts.append(chunk.data)
        if first.total_bytes and received != first.total_bytes:
            raise InvalidArgument(
                f"checkpoint upload incomplete: received {received} of {first.total_bytes} announced bytes; push it again"
            )
        t0 = time.perf_counter()
        ckpt = from_bytes(b"".join(parts))
        with self._scoring_slot():
            session.load_checkpoint(ckpt, first.version)
        return pb.UploadCheckpointResponse(version=first.version, bytes_received=received,
                                           load_seconds=time.perf_counter() - t0)

    def _read_checkpoint_path(self, name: str) -> bytes:
        """The bytes of a checkpoint file inside --checkpoint-dir; anything resolving outside is refused."""
        if self.checkpoint_dir is None:
            raise FailedPrecondition("this server reads no checkpoint paths (start it with --checkpoint-dir); "
                                     "stream the checkpoint bytes instead")
        if "\x00" in name:
            raise InvalidArgument("checkpoint path contains a NUL byte")
        path = (self.checkpoint_dir / name).resolve()  # follows symlinks, collapses '..'
        if not path.is_relative_to(self.checkpoint_dir):
            raise InvalidArgument(f"checkpoint path {name!r} resolves outside the server's --checkpoint-dir; "
                                  "name a file inside it (no '..', no symlinks leading out)")
        if not path.is_file():
            raise InvalidArgument(f"checkpoint path {name!r} is not a file in the server's --checkpoint-dir")
        size = path.stat().st_size
        if size > self.max_checkpoint_bytes:
            raise ResourceExhausted(f"checkpoint of {size} bytes exceeds the server's limit of {self.max_checkpoint_bytes}")
        return path.read_bytes()

    # -- selection ---------------------------------------------------------------------
    def Select(self, request: pb.SelectRequest, context) -> pb.SelectResponse:
        session = self._session(request.session_id, context)
        clock = _CodecClock()
        with clock:
            chunk = self._decode_chunk(request)
        if chunk is None:
            raise InvalidArgument("Select: the pool is empty (ids and labels are required)")
        with self._scoring_slot() as waited:
            result = session.select([chunk], request.budget, progress=progress_from(request.progress),
                                    policy=request.policy, return_scores=request.return_scores)
        return self._response(result, clock, waited)

    def SelectStream(self, request_iterator: Iterator[pb.SelectRequest], context) -> pb.SelectResponse:
        header = next(request_iterator, None)
        if header is None:
            raise InvalidArgument("SelectStream received no messages; the first carries session_id and budget")
        session = self._session(header.session_id, context)
        clock = _CodecClock()

        # Chunks are decoded lazily so the session scores each one as it arrives
        # and the raw inputs of earlier chunks can be freed (bounded memory).
        def chunks() -> Iterator[PoolChunk]:
            for i, msg in enumerate(_prepend(header, request_iterator)):
                if i and msg.session_id and msg.session_id != header.session_id:
                    raise InvalidArgument("SelectStream: every message must belong to the session named in the first")
                with clock:
                    chunk = self._decode_chunk(msg)
                if chunk is not None:
                    yield chunk

        with self._scoring_slot() as waited:
            result = session.select(chunks(), header.budget, progress=progress_from(header.progress),
                                    policy=header.policy, return_scores=header.return_scores)
        return self._response(result, clock, waited)

    @staticmethod
    def _decode_chunk(msg: pb.SelectRequest) -> PoolChunk | None:
        if not codec.is_set(msg.ids) and not codec.is_set(msg.labels) and not codec.is_set(msg.inputs):
            return None
        if not codec.is_set(msg.ids) or not codec.is_set(msg.labels):
            raise InvalidArgument("a pool chunk needs both ids (int64) and labels")
        return PoolChunk(
            ids=codec.decode(msg.ids, name="ids"),
            labels=codec.decode(msg.labels, name="labels"),
            inputs=codec.decode(msg.inputs, name="inputs") if codec.is_set(msg.inputs) else None,
        )

    @staticmethod
    def _response(result, clock: "_CodecClock", queue_seconds: float = 0.0) -> pb.SelectResponse:
        with clock:
            response = pb.SelectResponse(
                selected_ids=codec.encode(result.selected_ids.long()),
                checkpoint_version=result.checkpoint_version,
            )
            if result.weights is not None:
                response.weights.CopyFrom(codec.encode(result.weights.float()))
            if result.scores is not None:
                response.scores.CopyFrom(codec.encode(result.scores.float()))
            if result.diagnostics:
                response.diagnostics_json = json.dumps(result.diagnostics)
        response.cost.CopyFrom(pb.ServerCost(compute_seconds=result.compute_seconds, codec_seconds=clock.seconds,
                                             queue_seconds=queue_seconds, samples_scored=result.samples_scored))
        return response

    # -- training-side statistics ---------------------------------------------------------
    def Report(self, request: pb.ReportRequest, context) -> pb.ReportResponse:
        session = self._session(request.session_id, context)
        if not codec.is_set(request.ids) or not codec.is_set(request.losses):
            raise InvalidArgument("Report needs ids and losses")
        ids = codec.decode(request.ids, name="ids")
        losses = codec.decode(request.losses, name="losses")
        probs = codec.decode(request.true_class_probs, name="true_class_probs") if codec.is_set(request.true_class_probs) else None
        correct = codec.decode(request.correct, name="correct") if codec.is_set(request.correct) else None
        seconds = session.report(ids, losses, probs, correct, progress_from(request.progress))
        return pb.ReportResponse(samples=int(ids.numel()), compute_seconds=seconds)

    # -- introspection ---------------------------------------------------------------
    def Describe(self, request: pb.DescribeRequest, context) -> pb.DescribeResponse:
        strategies = []
        for name, reg in selectors().items():
            info = reg.obj.info()
            strategies.append(pb.StrategyInfo(
                name=name, description=info["description"], default_mode=info["default_mode"],
                default_policy=info["default_policy"], plugin=reg.plugin,
                options_json=json.dumps(info["options"], default=str),
            ))
        return pb.DescribeResponse(version=__version__, device=str(self.device), strategies=strategies,
                                   models=list(models()), max_message_bytes=self.max_message_bytes)


class _CodecClock:
    """Accumulates the time spent decoding requests and encoding responses."""

    def __init__(self):
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._t0
        return False


def _prepend(first, rest):
    yield first
    yield from rest
