"""How the trainer talks to a scorer: one interface, two transports.

`EmbeddedScorer` runs a `dataselect.scoring.ScoringSession` in-process;
`dataselect.client.remote.RemoteScorer` talks gRPC to `dataselect-server`.
The training loop only sees this interface, so embedded and remote runs go
through the same code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import torch
from torch import nn

from dataselect.scoring import PoolChunk, ScoringSession
from dataselect.strategy import AuxiliaryLoss, Progress


@dataclass
class SessionSpec:
    """Everything needed to open a scoring session.

    The model is a registered architecture (`model_name` + `model_kwargs`, what a
    server can build) or, in-process, `model`: a module the embedded session
    scores on a copy of (`model_name` is then only its label).
    """

    strategy: str
    options: dict[str, Any]
    model_name: str
    model_kwargs: dict[str, Any]
    num_classes: int
    seed: int = 0
    dataset: str = ""
    dataset_size: int = 0
    policy: str = ""
    #: Score on inputs downscaled by this factor in (0, 1] (1.0 = full size).
    input_scale: float = 1.0
    #: In-process only: the module to score with (copied by the embedded session); None = build `model_name`.
    model: Any = field(default=None, repr=False, compare=False)
    #: The final nn.Linear's name for last-layer signals (None: found by a trial forward).
    last_layer: str | None = None
    #: One sample's shape when known (registered image models know theirs).
    input_shape: tuple[int, ...] | None = None
    #: For a server: the model as an `export_model` archive, when it is not a registered architecture
    #: (`model_name` is then "exported:<digest>" and `model` the module itself, for an offline fallback).
    exported: bytes | None = field(default=None, repr=False, compare=False)


@dataclass
class SessionInfo:
    """What the scorer told us about the session it opened."""

    session_id: str
    strategy: str
    resolved_options: dict[str, Any]
    default_mode: str
    policy: str
    device: str
    signals: list[str]
    uses_reports: bool
    #: A loss term the strategy asks the trainer to add (e.g. DynaMS's proxy); None = none.
    auxiliary_loss: AuxiliaryLoss | None = None


@dataclass
class ScoreReply:
    selected_ids: torch.Tensor  # int64 [k]
    weights: torch.Tensor | None  # float32 [k] or None (all ones)
    scores: torch.Tensor | None
    checkpoint_version: int
    server_compute_seconds: float
    samples_scored: int
    #: time spent encoding, on the wire and decoding (0 for embedded)
    transfer_seconds: float = 0.0
    #: figures about this selection (e.g. "proxy_rank_correlation"), name: JSON value
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScorerCounters:
    checkpoint_bytes: int = 0
    checkpoint_pushes: int = 0
    reconnects: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class Scorer(Protocol):
    info: SessionInfo
    counters: ScorerCounters

    def push_checkpoint(self, model: nn.Module, version: int, step: int) -> None:
        """Make the scorer's model copy equal to `model` (tagged with `version`)."""

    def push_state(self, state: dict[str, torch.Tensor], version: int, step: int) -> None:
        """The same from a state dict (a snapshot taken on the trainer's thread when pushes are overlapped)."""

    def push_irreducible(self, state: dict[str, torch.Tensor]) -> None:
        """Give the scorer the irreducible-loss model's weights (strategies with the signal irreducible_loss)."""

    def select(self, ids: torch.Tensor, inputs: torch.Tensor | None, labels: torch.Tensor, budget: int,
               progress: Progress, *, return_scores: bool = False) -> ScoreReply:
        """Score a pool and return the selection (`inputs` may be None when no signals are needed)."""

    def report(self, ids: torch.Tensor, losses: torch.Tensor, true_class_probs: torch.Tensor | None,
               correct: torch.Tensor | None, progress: Progress) -> None:
        """Send training-side per-sample statistics (only when `info.uses_reports`)."""

    def close(self) -> None:
        """End the session; idempotent."""


class EmbeddedScorer:
    """Scoring in the trainer's own process, on its own model copy."""

    def __init__(self, spec: SessionSpec, *, device: torch.device | str = "cpu", micro_batch: int | str = 1024,
                 precision: str = "auto", channels_last: bool | str | None = "auto", compile: bool = False):
        model = spec.model_name if spec.model is None else scoring_copy(unwrap_model(spec.model))
        self.session = ScoringSession(
            spec.strategy, spec.options, model, spec.model_kwargs,
            num_classes=spec.num_classes, seed=spec.seed, dataset=spec.dataset,
            dataset_size=spec.dataset_size, policy=spec.policy, device=device, micro_batch=micro_batch,
            precision=precision, channels_last=channels_last, compile=compile, input_scale=spec.input_scale,
            last_layer=spec.last_layer, input_shape=spec.input_shape, model_label=spec.model_name,
        )
        cls = type(self.session.strategy_object)
        self.info = SessionInfo(
            session_id="embedded", strategy=spec.strategy, resolved_options=dict(self.session.strategy_object.opts),
            default_mode=cls.default_mode, policy=self.session.policy, device=str(self.session.device),
            signals=sorted(self.session.signals), uses_reports=cls.uses_reports,
        )
        self.info.auxiliary_loss = self.session.strategy_object.auxiliary_loss
        self.counters = ScorerCounters()

    def push_checkpoint(self, model: nn.Module, version: int, step: int) -> None:
        self.push_state(model.state_dict(), version, step)

    def push_state(self, state: dict[str, torch.Tensor], version: int, step: int) -> None:
        # In-process there is nothing to serialise: copy the weights into the scoring copy.
        self.session.load_state_dict(state, version)
        self.counters.checkpoint_pushes += 1

    def push_irreducible(self, state: dict[str, torch.Tensor]) -> None:
        self.session.load_irreducible(state)

    def select(self, ids, inputs, labels, budget, progress, *, return_scores=False) -> ScoreReply:
        return self.select_chunks([PoolChunk(ids=ids, labels=labels, inputs=inputs)], budget, progress,
                                  return_scores=return_scores)

    def select_chunks(self, chunks, budget, progress, *, return_scores=False) -> ScoreReply:
        """Score a pool that arrives in pieces (`PoolChunk`s, e.g. a data set streamed from disk)."""
        res = self.session.select(chunks, budget, progress=progress, return_scores=return_scores)
        return ScoreReply(res.selected_ids, res.weights, res.scores, res.checkpoint_version,
                          res.compute_seconds, res.samples_scored, diagnostics=res.diagnostics)

    def report(self, ids, losses, true_class_probs, correct, progress) -> None:
        self.session.report(ids, losses, true_class_probs, correct, progress)

    def close(self) -> None:
        if self.session.model is not None:
            self.session.close()


_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def scoring_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree (parameters, buffers, submodules, hooks) to score with.

    Other attributes a module holds (a LightningModule's trainer, a callback, a
    logger) are shared with the original, not copied: scoring only runs forward
    passes, and such objects may not be copyable at all.
    """
    memo: dict[int, object] = {}
    for m in model.modules():
        for key, value in vars(m).items():
            if key not in _MODULE_INTERNALS and not isinstance(value, (torch.Tensor, nn.Module)):
                memo[id(value)] = value
    return copy.deepcopy(model, memo)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module itself, out of a DistributedDataParallel (`.module`) or torch.compile (`._orig_mod`) wrapper."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(
                getattr(model, "module", None), nn.Module):
            model = model.module
            continue
        return model


def average_diagnostics(parts: Iterable[dict[str, Any] | None], *, keep_other: bool = False) -> dict[str, Any]:
    """Diagnostics of several Selects (or replicas) as one dict: each numeric figure averaged over the
    dicts that have it (bools are not numbers). Other values are dropped, or with `keep_other` taken
    from the first dict that has them; a name that is a number anywhere is averaged."""
    merged: dict[str, Any] = {}
    numbers: dict[str, list[float]] = {}
    for part in parts:
        for key, value in (part or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers.setdefault(key, []).append(float(value))
            elif keep_other:
                merged.setdefault(key, value)
    merged.update({key: sum(v) / len(v) for key, v in numbers.items()})
    return merged
