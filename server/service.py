"""The `dataselect.v1.Selection` servicer: wire messages in, `ScoringSession` calls, wire messages out.

All scoring logic lives in `dataselect.scoring.ScoringSession` (shared with
the trainer's embedded mode); this module decodes, checks, delegates and
encodes. Errors are raised as `dataselect.errors` exceptions and mapped to
status codes by `dataselect.server.interceptors`.

The checks here are the server's boundary: everything a remote caller sends
is bounded before it reaches a session, so that no value that passes here can
overflow, recurse or allocate without limit later (and then be blamed on the
strategy plugin). Each refusal names the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dataselect import __version__, codec
from dataselect.checkpoint import check_state, from_bytes, validate
from dataselect.errors import (
    Cancelled,
    DataselectError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PluginError,
    ResourceExhausted,
)
from dataselect.exported import load_exported
from dataselect.models import build_model, input_dtype
from dataselect.registry import get_model_builder, models, strategies
from dataselect.scoring import PoolChunk, ScoringSession
from dataselect.server.auth import principal_of
from dataselect.server.sessions import SessionStore
from dataselect.strategy import Progress
from dataselect.v1 import selection_pb2 as pb
from dataselect.v1 import selection_pb2_grpc as pb_grpc

#: Longest strategy, model, policy or data set name accepted (names are echoed in errors).
MAX_NAME_CHARS = 200
#: Longest options_json / kwargs_json, and deepest nesting inside them.
MAX_JSON_CHARS = 64 * 1024
MAX_JSON_DEPTH = 32
#: Largest magnitude of a float input. Registered models take uint8 images or floats in [0, 1]
#: (or raw 0-255 floats, or standardised values); 1e6 leaves about 32 orders of magnitude before
#: float32 overflows (3.4e38) for the activations, logits and squared gradient norms computed
#: from them, while float64 inputs beyond float32's range would become inf on conversion.
MAX_INPUT_MAGNITUDE = 1e6
#: Largest reported loss: its square, summed over 1e8 samples, still fits in float32.
MAX_LOSS = 1e15
#: Largest epoch and total_epochs in a Progress (strategies index per-epoch tables with them).
MAX_EPOCHS = 1_000_000
MAX_STEP = 2**53
#: How often a call waiting for a slot or a session checks whether its caller is still there.
POLL_SECONDS = 0.05


def _json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            depth = max(depth, d)
            if d > MAX_JSON_DEPTH:
                return d
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return depth


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json_object(text: str, field: str) -> dict[str, Any]:
    """'' means {}; anything but a bounded JSON object of finite numbers is the caller's mistake."""
    if not text:
        return {}
    if len(text) > MAX_JSON_CHARS:
        raise InvalidArgument(f"{field} is {len(text)} characters long; at most {MAX_JSON_CHARS} are accepted")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidArgument(f"{field} is nested too deeply; at most {MAX_JSON_DEPTH} levels are accepted") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, an integer of thousands of digits
        raise InvalidArgument(f"{field} is not valid JSON ({str(exc)[:200]}); send a JSON object of finite "
                              "numbers, strings, lists and objects such as {\"key\": 1}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field} must be a JSON object, got {type(value).__name__}")
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise InvalidArgument(f"{field} is nested too deeply; at most {MAX_JSON_DEPTH} levels are accepted")
    return value


def check_name(value: str, field: str) -> str:
    if len(value) > MAX_NAME_CHARS:
        raise InvalidArgument(f"{field} is {len(value)} characters long (at most {MAX_NAME_CHARS}): "
                              f"{value[:40]!r}...; send a registered name (Describe lists them)")
    return value


def progress_from(msg: pb.Progress) -> Progress:
    """The call's Progress, refused when a field is out of range (strategies schedule and index with them)."""
    for name, value, top in (("epoch", msg.epoch, MAX_EPOCHS), ("total_epochs", msg.total_epochs, MAX_EPOCHS),
                             ("step", msg.step, MAX_STEP)):
        if not 0 <= value <= top:
            raise InvalidArgument(f"progress.{name} must lie in [0, {top}], got {value}")
    fraction = msg.fraction
    if not 0.0 <= fraction <= 1.0:  # also refuses NaN
        raise InvalidArgument(f"progress.fraction is the share of training done and must lie in [0, 1], got {fraction!r}")
    return Progress(epoch=msg.epoch, step=msg.step, total_epochs=msg.total_epochs, fraction=fraction)


def check_magnitude(t: torch.Tensor, field: str, limit: float, *, low: float | None = None) -> None:
    """Floats in `t` must be finite and within [-limit, limit] (or [low, limit])."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.detach().reshape(-1))
    lo, hi = float(lo), float(hi)
    floor = -limit if low is None else low
    if not (floor <= lo and hi <= limit):  # NaN fails both comparisons
        if not (math.isfinite(lo) and math.isfinite(hi)) or not bool(torch.isfinite(t).all()):
            raise InvalidArgument(f"{field} contain NaN or Inf; send finite values")
        worst = lo if lo < floor else hi
        raise InvalidArgument(f"{field} hold {worst:.3g}, outside [{floor:g}, {limit:g}]: such values overflow "
                              "float32 arithmetic in scoring; send images as uint8 or floats in [0, 1]"
                              if field == "inputs" else
                              f"{field} hold {worst:.3g}, outside [{floor:g}, {limit:g}]; send the values as computed "
                              "by the trainer")


def _allocation_failure(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, MemoryError):
            return True
        text = str(exc).lower()
        if isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate" in text
                                              or "cannot allocate" in text):
            return True
        exc = exc.__cause__
    return False


@contextmanager
def _plugin_memory(what: str) -> Iterator[None]:
    """A strategy that runs out of memory is RESOURCE_EXHAUSTED (not INTERNAL) and says what to shrink."""
    try:
        yield
    except PluginError as exc:
        if not _allocation_failure(exc.__cause__):
            raise
        raise ResourceExhausted(f"{str(exc)[:300]} while {what}: it could not allocate memory; use smaller "
                                "strategy options (e.g. fewer warmup_epochs) or a smaller dataset_size") from None


def estimate_model_bytes(name: str, kwargs: dict[str, Any]) -> int | None:
    """Bytes of parameters and buffers `name` built with `kwargs` would hold, found on the meta
    device (nothing allocated); None when the builder cannot run there."""
    try:
        with torch.device("meta"):
            model = build_model(name, **kwargs)
        return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    except Exception:  # noqa: BLE001 - the real build reports the error
        return None

def _auxiliary_loss_message(aux) -> pb.AuxiliaryLoss | None:
    if aux is None:
        return None
    return pb.AuxiliaryLoss(name=aux.name, weight=float(aux.weight), params_json=json.dumps(dict(aux.params)))


class SelectionServicer(pb_grpc.SelectionServicer):
    """Args beyond the obvious:
        scoring_slots: how many calls may score (use the device) at once; the rest wait
            (bounded by the in-flight limit in `interceptors`), and ServerCost.queue_seconds
            reports the wait. A SelectStream holds a slot only while it scores a chunk, never
            while it waits for the client's next message.
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
        #: Set when the server stops: calls still computing stop at their next check.
        self.stopping = threading.Event()

    def _session(self, session_id: str, context) -> ScoringSession:
        return self.store.get(session_id, principal_of(context, self.authenticated))

    def _cancelled(self, context) -> Callable[[], bool]:
        """True once the caller is gone (cancelled, deadline passed) or the server is stopping."""
        if context is None:
            return self.stopping.is_set
        return lambda: self.stopping.is_set() or not context.is_active()

    def _wait(self, acquire: Callable[[float], bool], context, what: str) -> float:
        """Block on `acquire(timeout)` in short steps, giving up once the caller is gone; returns the seconds waited."""
        t0 = time.perf_counter()
        cancelled = self._cancelled(context)
        while not acquire(POLL_SECONDS):
            if cancelled():
                raise Cancelled(f"stopped waiting for {what}: the caller cancelled, its deadline passed or the "
                                "server is stopping")
        return time.perf_counter() - t0

    def _wait_until_free(self, session: ScoringSession, context) -> float:
        """Wait (as long as the caller is there) until no other call runs on `session`.

        A call on a busy session then does not take a scoring slot only to block on the session.
        """
        def free(timeout: float) -> bool:
            if not session.lock.locked():
                return True
            time.sleep(timeout)
            return not session.lock.locked()

        return self._wait(free, context, "another call on the same session")

    @contextmanager
    def _scoring_slot(self, context=None):
        """Wait for a scoring slot (giving up if the caller goes away); yields the seconds waited."""
        waited = self._wait(lambda t: self._slots.acquire(timeout=t), context, "a scoring slot")
        try:
            yield waited
        finally:
            self._slots.release()

    # -- sessions --------------------------------------------------------------------
    def OpenSession(self, request: pb.OpenSessionRequest, context) -> pb.OpenSessionResponse:
        for field, value in (("strategy", request.strategy), ("model.name", request.model.name),
                             ("policy", request.policy), ("dataset", request.dataset)):
            check_name(value, field)
        options = parse_json_object(request.options_json, "options_json")
        kwargs = parse_json_object(request.model.kwargs_json, "model.kwargs_json")
        if not (math.isfinite(request.input_scale) and request.input_scale >= 0):
            raise InvalidArgument(f"input_scale must be a number in (0, 1] (0 = 1), got {request.input_scale!r}")
        if request.model.exported:
            model, model_kwargs = self._exported_model(request.model, kwargs), None
            estimate, label = len(request.model.exported), f"model {request.model.name!r}"
        else:
            if not request.model.name:
                raise InvalidArgument(f"model.name is empty; known models: {', '.join(models())}")
            get_model_builder(request.model.name)  # an unknown name lists the known ones before anything is built
            self._check_model_kwargs(kwargs)
            self._check_sample_size(kwargs)
            model, model_kwargs = request.model.name, kwargs
            estimate = estimate_model_bytes(request.model.name, kwargs)
            label = f"model {request.model.name!r} with {json.dumps(kwargs)[:200]}"
        principal = principal_of(context, self.authenticated)
        with self.store.reserve(estimate or 0, label):
            session = ScoringSession(
                request.strategy, options, model, model_kwargs,
                num_classes=request.num_classes, seed=request.seed, dataset=request.dataset,
                dataset_size=request.dataset_size, policy=request.policy, device=self.device,
                micro_batch=self.micro_batch, input_scale=request.input_scale or 1.0,
                model_label=request.model.name, **self.engine_options,
            )
            try:
                session_id = self.store.add(session, principal, reserved=estimate or 0)
            except BaseException:
                session.close()
                raise
        cls = type(session.strategy_object)
        return pb.OpenSessionResponse(
            session_id=session_id, strategy=request.strategy,
            resolved_options_json=json.dumps(session.strategy_object.opts), default_mode=cls.default_mode,
            policy=session.policy, device=str(session.device),
            # The instance's signals: options may change what a strategy needs (e.g. a gradient scope).
            signals=sorted(session.signals),
            uses_reports=cls.uses_reports,
            proxy=None if session.proxy is None else pb.ProxySpec(width_ratio=session.proxy.ratio,
                                                                  loss_weight=session.proxy.loss_weight),
            auxiliary_loss=_auxiliary_loss_message(session.strategy_object.auxiliary_loss),
        )

    def _exported_model(self, spec: pb.ModelSpec, kwargs: dict[str, Any]) -> torch.nn.Module:
        """A model shipped as an `export_model` archive: named by its digest, loaded as data (never as code)."""
        data = spec.exported
        digest = hashlib.sha256(data).hexdigest()[:12]
        if spec.name != f"exported:{digest}":
            raise InvalidArgument(f"model.name must be 'exported:{digest}' for this archive (the first 12 hex digits "
                                  f"of its SHA-256), got {spec.name[:40]!r}: send the archive export_model wrote, "
                                  "unchanged")
        if kwargs:
            raise InvalidArgument("model.kwargs_json must be empty for an exported model (its weights and shapes "
                                  "are in the archive)")
        return load_exported(data, max_bytes=self.max_message_bytes)

    @staticmethod
    def _check_model_kwargs(kwargs: dict[str, Any]) -> None:
        """Arguments whose values are known to break every score, named before anything is built."""
        for name in ("mean", "std"):
            if name not in kwargs:
                continue
            values = kwargs[name] if isinstance(kwargs[name], list) else [kwargs[name]]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise InvalidArgument(f"model.kwargs_json: {name} must be a number or a list of numbers, "
                                      f"got {json.dumps(kwargs[name])[:100]}")
            if name == "std" and not all(v > 0 for v in values):
                raise InvalidArgument(f"model.kwargs_json: std must be > 0 for every channel (inputs are divided by "
                                      f"it), got {json.dumps(kwargs[name])[:100]}")

    def _check_sample_size(self, kwargs: dict[str, Any]) -> None:
        """One sample of the model's declared input shape must fit in a message (checked before any trial forward)."""
        c, size = kwargs.get("in_channels"), kwargs.get("image_size")
        if isinstance(c, int) and isinstance(size, int) and not isinstance(c, bool) and not isinstance(size, bool):
            if c > 0 and size > 0 and c * size * size > self.max_message_bytes:
                raise InvalidArgument(
                    f"model.kwargs_json: in_channels {c} x image_size {size}^2 makes one sample {c * size * size} "
                    f"bytes, more than the server's message limit of {self.max_message_bytes}")

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
            received = 0
        else:
            data, received = self._receive_checkpoint(first, request_iterator)
        t0 = time.perf_counter()
        ckpt = validate(from_bytes(data))
        del data
        self._wait_until_free(session, context)
        with self._scoring_slot(context):
            self._trial_forward(session, ckpt, context)
            session.load_checkpoint(ckpt, first.version)
        return pb.UploadCheckpointResponse(version=first.version, bytes_received=received,
                                           load_seconds=time.perf_counter() - t0)

    def _receive_checkpoint(self, first: pb.CheckpointChunk, request_iterator) -> tuple[bytes, int]:
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
        return b"".join(parts), received

    def _trial_forward(self, session: ScoringSession, ckpt: dict, context) -> None:
        """Before the weights replace the session's: the same checks as loading, then a forward pass with them
        on a black and a white input of the model's shape. Weights that are finite but so large that the logits
        overflow (3e38) are refused here, naming the largest tensor, instead of making every score NaN later."""
        shape = session.input_shape
        model = session.model
        if model is None or shape is None or None in shape:
            return
        delta_of = ckpt.get("delta_of")
        if ckpt.get("model") not in (None, session.model_name) or (
                delta_of is not None and (type(delta_of) is not int or delta_of != session.checkpoint_version)):
            return  # refused by load_checkpoint with its own message
        state = ckpt["state_dict"]
        if delta_of is not None:
            state = {**model.state_dict(), **state}
        own = model.state_dict()
        if set(state) != set(own) or any(tuple(v.shape) != tuple(own[k].shape) for k, v in state.items()):
            return  # refused by load_checkpoint, naming the keys and shapes
        trial = {k: v.to(device=own[k].device, dtype=own[k].dtype) if v.is_floating_point() else v.to(own[k].device)
                 for k, v in state.items()}
        dtype = input_dtype(session.scoring_model)
        top = 255 if dtype == torch.uint8 else 1
        x = torch.stack([torch.zeros(shape, dtype=dtype), torch.full(shape, top, dtype=dtype)])
        x = x.to(session.device)
        if session.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        self._wait(lambda t: session.lock.acquire(timeout=t), context, "another call on the same session")
        try:
            if session.closed:
                raise NotFound("session closed: open a new session")
            with torch.inference_mode():
                logits = torch.func.functional_call(model, trial, (x,), strict=False)
        except DataselectError:
            raise
        except Exception as exc:
            raise InvalidArgument(f"checkpoint: model {session.model_name!r} fails with these weights: "
                                  f"{type(exc).__name__}: {str(exc)[:200]}") from None
        finally:
            session.lock.release()
        if isinstance(logits, torch.Tensor) and not bool(torch.isfinite(logits.float()).all()):
            check_state(model, state, model_name=session.model_name)  # NaN or Inf weights: its own message
            name, top = max(((k, float(v.abs().max())) for k, v in state.items() if v.is_floating_point() and v.numel()),
                            key=lambda kv: kv[1], default=("?", float("nan")))
            raise InvalidArgument(f"checkpoint: these weights give non-finite logits on a blank input (the largest "
                                  f"weight is {top:.3g}, in state_dict[{name[:100]!r}]); push weights from before "
                                  "training diverged")

    def _read_checkpoint_path(self, name: str) -> bytes:
        """The bytes of a checkpoint file inside --checkpoint-dir; anything resolving outside is refused."""
        if self.checkpoint_dir is None:
            raise FailedPrecondition("this server reads no checkpoint paths (start it with --checkpoint-dir); "
                                     "stream the checkpoint bytes instead")
        shown = repr(name[:100]) + ("..." if len(name) > 100 else "")
        if "\x00" in name:
            raise InvalidArgument("checkpoint path contains a NUL byte")
        if len(name.encode("utf-8", "surrogatepass")) > 4096:
            raise InvalidArgument(f"checkpoint path {shown} is longer than 4096 bytes; name a file inside the "
                                  "server's --checkpoint-dir")
        try:
            path = (self.checkpoint_dir / name).resolve()  # follows symlinks, collapses '..'
        except (OSError, RuntimeError) as exc:  # a symlink loop, a component too long
            raise InvalidArgument(f"checkpoint path {shown} cannot be resolved ({getattr(exc, 'strerror', None) or exc}); "
                                  "name a file inside the server's --checkpoint-dir") from None
        if not path.is_relative_to(self.checkpoint_dir):
            raise InvalidArgument(f"checkpoint path {shown} resolves outside the server's --checkpoint-dir; "
                                  "name a file inside it (no '..', no symlinks leading out)")
        try:
            if not path.is_file():
                raise InvalidArgument(f"checkpoint path {shown} is not a file in the server's --checkpoint-dir")
            size = path.stat().st_size
            if size > self.max_checkpoint_bytes:
                raise ResourceExhausted(f"checkpoint of {size} bytes exceeds the server's limit of {self.max_checkpoint_bytes}")
            with path.open("rb") as fh:  # read at most the limit, even if the file grows meanwhile
                data = fh.read(self.max_checkpoint_bytes + 1)
        except OSError as exc:
            raise InvalidArgument(f"checkpoint path {shown} cannot be read ({exc.strerror or exc})") from None
        if len(data) > self.max_checkpoint_bytes:
            raise ResourceExhausted(f"checkpoint exceeds the server's limit of {self.max_checkpoint_bytes} bytes")
        return data

    # -- selection ---------------------------------------------------------------------
    def Select(self, request: pb.SelectRequest, context) -> pb.SelectResponse:
        session = self._session(request.session_id, context)
        progress = progress_from(request.progress)
        clock = _CodecClock()
        with clock:
            chunk = self._decode_chunk(request)
        if chunk is None:
            raise InvalidArgument("Select: the pool is empty (ids and labels are required)")
        waited = self._wait_until_free(session, context)
        with self._scoring_slot(context) as slot_wait, _plugin_memory("selecting"):
            result = session.select([chunk], request.budget, progress=progress, policy=request.policy,
                                    return_scores=request.return_scores, cancelled=self._cancelled(context))
        return self._response(result, clock, waited + slot_wait)

    def SelectStream(self, request_iterator: Iterator[pb.SelectRequest], context) -> pb.SelectResponse:
        header = next(request_iterator, None)
        if header is None:
            raise InvalidArgument("SelectStream received no messages; the first carries session_id and budget")
        session = self._session(header.session_id, context)
        progress = progress_from(header.progress)
        clock = _CodecClock()
        slot = _Slot(self, context)

        # Chunks are decoded lazily so the session scores each one as it arrives
        # and the raw inputs of earlier chunks can be freed (bounded memory). The
        # scoring slot is let go while the server waits for the client's next
        # message: a slow or silent client never holds up other callers.
        def chunks() -> Iterator[PoolChunk]:
            msg = header
            while True:
                if msg.session_id and msg.session_id != header.session_id:
                    raise InvalidArgument("SelectStream: every message must belong to the session named in the first")
                with clock:
                    chunk = self._decode_chunk(msg)
                if chunk is not None:
                    yield chunk
                slot.release()
                msg = next(request_iterator, None)
                slot.acquire()
                if msg is None:
                    return

        waited = self._wait_until_free(session, context)
        slot.acquire()
        try:
            with _plugin_memory("selecting"):
                result = session.select(chunks(), header.budget, progress=progress, policy=header.policy,
                                        return_scores=header.return_scores, cancelled=self._cancelled(context))
        finally:
            slot.release()
        return self._response(result, clock, waited + slot.waited)

    @staticmethod
    def _decode_chunk(msg: pb.SelectRequest) -> PoolChunk | None:
        if not codec.is_set(msg.ids) and not codec.is_set(msg.labels) and not codec.is_set(msg.inputs):
            return None
        if not codec.is_set(msg.ids) or not codec.is_set(msg.labels):
            raise InvalidArgument("a pool chunk needs both ids (int64) and labels")
        inputs = codec.decode(msg.inputs, name="inputs") if codec.is_set(msg.inputs) else None
        if inputs is not None:
            check_magnitude(inputs, "inputs", MAX_INPUT_MAGNITUDE)
        return PoolChunk(ids=codec.decode(msg.ids, name="ids"), labels=codec.decode(msg.labels, name="labels"),
                         inputs=inputs)

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
        progress = progress_from(request.progress)
        ids = codec.decode(request.ids, name="ids")
        losses = codec.decode(request.losses, name="losses")
        check_magnitude(losses, "losses", MAX_LOSS)
        probs = codec.decode(request.true_class_probs, name="true_class_probs") if codec.is_set(request.true_class_probs) else None
        if probs is not None:
            if not probs.is_floating_point():
                raise InvalidArgument(f"true_class_probs must be floats in [0, 1], got {probs.dtype}")
            check_magnitude(probs, "true_class_probs", 1.0, low=0.0)
        correct = codec.decode(request.correct, name="correct") if codec.is_set(request.correct) else None
        if correct is not None and correct.is_floating_point():
            raise InvalidArgument(f"correct must be bool (or 0/1 integers), got {correct.dtype}")
        self._wait_until_free(session, context)
        with _plugin_memory("taking a Report"):
            seconds = session.report(ids, losses, probs, correct, progress)
        return pb.ReportResponse(samples=int(ids.numel()), compute_seconds=seconds)

    # -- introspection ---------------------------------------------------------------
    def Describe(self, request: pb.DescribeRequest, context) -> pb.DescribeResponse:
        infos = []
        for name, reg in strategies().items():
            info = reg.obj.info()
            infos.append(pb.StrategyInfo(
                name=name, description=info["description"], default_mode=info["default_mode"],
                default_policy=info["default_policy"], plugin=reg.plugin,
                options_json=json.dumps(info["options"], default=str),
            ))
        return pb.DescribeResponse(version=__version__, device=str(self.device), strategies=infos,
                                   models=list(models()), max_message_bytes=self.max_message_bytes)


class _Slot:
    """A scoring slot a streaming call takes and lets go of repeatedly; counts the time spent waiting."""

    def __init__(self, servicer: SelectionServicer, context):
        self._servicer = servicer
        self._context = context
        self.held = False
        self.waited = 0.0

    def acquire(self) -> None:
        if not self.held:
            sem = self._servicer._slots
            self.waited += self._servicer._wait(lambda t: sem.acquire(timeout=t), self._context, "a scoring slot")
            self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._servicer._slots.release()


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
