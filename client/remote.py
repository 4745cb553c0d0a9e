"""`RemoteScorer`: the `Scorer` interface over gRPC to `dataselect-server`.

The twin of `dataselect.client.scorer.EmbeddedScorer`: same calls, same
results for the same seed and weights, with the scoring done by the server's
`ScoringSession`. Every call carries a deadline; status codes come back as
the `dataselect.errors` class the server raised.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Iterator

import grpc
import torch
from torch import nn

from dataselect import codec
from dataselect.checkpoint import make_checkpoint, to_bytes
from dataselect.client.scorer import ScoreReply, ScorerCounters, SessionInfo, SessionSpec
from dataselect.errors import DataselectError
from dataselect.plugins.base import Progress
from dataselect.server.status import error_for
from dataselect.v1 import selection_pb2 as pb
from dataselect.v1 import selection_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20
CHECKPOINT_CHUNK_BYTES = 2**20


class ServerUnavailable(DataselectError):
    """The scoring server cannot be reached or did not answer in time."""


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
    """

    def __init__(self, address: str, spec: SessionSpec, *, timeout: float = 120.0, connect_timeout: float = 10.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, chunk_bytes: int = CHECKPOINT_CHUNK_BYTES):
        self.address = address
        self.spec = spec
        self.timeout = float(timeout)
        self.max_message_bytes = int(max_message_bytes)
        # A chunk must fit in one message whatever limit the caller chose.
        self.chunk_bytes = max(1, min(int(chunk_bytes), self.max_message_bytes // 2))
        self.counters = ScorerCounters()
        self._closed = False
        self._resources = contextlib.ExitStack()
        self._channel = self._resources.enter_context(grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]))
        try:
            grpc.channel_ready_future(self._channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            self._resources.close()
            self._closed = True
            raise ServerUnavailable(self._unreachable()) from None
        self._stub = pb_grpc.SelectionStub(self._channel)
        try:
            resp = self._call(self._stub.OpenSession, pb.OpenSessionRequest(
                strategy=spec.strategy, options_json=json.dumps(spec.options or {}),
                model=pb.ModelSpec(name=spec.model_name, kwargs_json=json.dumps(spec.model_kwargs)),
                seed=spec.seed, num_classes=spec.num_classes, dataset=spec.dataset,
                dataset_size=spec.dataset_size, policy=spec.policy,
            ))
        except BaseException:
            self._resources.close()
            self._closed = True
            raise
        self.info = SessionInfo(
            session_id=resp.session_id, strategy=resp.strategy,
            resolved_options=json.loads(resp.resolved_options_json or "{}"), default_mode=resp.default_mode,
            policy=resp.policy, device=resp.device, signals=list(resp.signals), uses_reports=resp.uses_reports,
        )

    # -- the Scorer interface -----------------------------------------------------------
    def push_checkpoint(self, model: nn.Module, version: int, step: int) -> None:
        data = to_bytes(make_checkpoint(self.spec.model_name, self.spec.model_kwargs, model, version=version, step=step))

        def chunks() -> Iterator[pb.CheckpointChunk]:
            yield pb.CheckpointChunk(session_id=self.info.session_id, version=version, total_bytes=len(data),
                                     data=data[:self.chunk_bytes])
            for start in range(self.chunk_bytes, len(data), self.chunk_bytes):
                yield pb.CheckpointChunk(data=data[start:start + self.chunk_bytes])

        self._call(self._stub.UploadCheckpoint, chunks())
        self.counters.checkpoint_bytes += len(data)
        self.counters.checkpoint_pushes += 1

    def select(self, ids: torch.Tensor, inputs: torch.Tensor | None, labels: torch.Tensor, budget: int,
               progress: Progress, *, return_scores: bool = False) -> ScoreReply:
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
                          samples_scored=resp.cost.samples_scored, transfer_seconds=max(0.0, wall - compute))

    def report(self, ids: torch.Tensor, losses: torch.Tensor, true_class_probs: torch.Tensor | None,
               correct: torch.Tensor | None, progress: Progress) -> None:
        req = pb.ReportRequest(session_id=self.info.session_id, ids=codec.encode(ids.long()),
                               losses=codec.encode(losses.float()), progress=_progress_msg(progress))
        if true_class_probs is not None:
            req.true_class_probs.CopyFrom(codec.encode(true_class_probs.float()))
        if correct is not None:
            req.correct.CopyFrom(codec.encode(correct.bool()))
        self._call(self._stub.Report, req)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # Best effort: the server may already be gone, and then the session is gone with it.
            self._stub.CloseSession(pb.CloseSessionRequest(session_id=self.info.session_id),
                                    timeout=min(self.timeout, 5.0))
        except grpc.RpcError:
            pass
        finally:
            self._resources.close()

    def __enter__(self) -> "RemoteScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _error(self, exc: grpc.RpcError) -> DataselectError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else "") or str(code)
        if code == grpc.StatusCode.UNAVAILABLE:
            return ServerUnavailable(f"{self._unreachable()} ({details})")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ServerUnavailable(f"dataselect-server at {self.address} did not answer within {self.timeout:g}s; "
                                     "raise the scorer timeout or use a faster server device")
        cls = error_for(code) or DataselectError
        return cls(details if cls is not DataselectError else f"dataselect-server: {code.name}: {details}")

    def _unreachable(self) -> str:
        return (f"cannot reach dataselect-server at {self.address}: start it with "
                f"`dataselect-server --port {_port_of(self.address)}` or fix --server")
