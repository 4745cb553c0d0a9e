"""`dataselect.Session`: data selection in your own training loop, scored in-process or on a server.

The shortest use (any model, any map-style dataset of `(input, target)` items):

    session = dataselect.Session("high_loss", model, epochs=epochs)   # server="host:50051" to score remotely
    loader = session.loader(train_set, batch_size=64, num_workers=2)
    for epoch in range(epochs):
        for x, y in loader:                      # the samples the strategy chose
            loss = session.loss(model(x.to(dev)), y.to(dev))
            opt.zero_grad(); loss.backward(); opt.step()

`session.loader` runs the strategy's training mode: `online` (every step a
candidate pool of `batch_size / fraction` samples is scored and `batch_size`
are trained on), `subset` (the data set is scored every `refresh` epochs and
the chosen part trained on) or `weighted` (each epoch draws by importance).
Warm-up epochs, Selective Backprop's batch filling, overlapped scoring and
pushing the model to the scorer every `sync_every` steps happen inside it.
`session.loss` applies the selection's loss weights, hands per-sample
training losses to strategies that learn from them (a no-op for the others)
and adds any auxiliary loss the strategy asks for.

The lower-level calls, for loops that draw their own candidates:
`session.select(inputs, targets, ids)` returns the rows to train on and their
weights; `session.report(ids, losses, logits=..., targets=...)` hands losses
back; `session.step()` counts an optimiser step (pushes follow from it).

The scorer is opened at first use: in-process on a copy of your model
(no registry name needed), or on `dataselect-server` when `server` is given,
which builds the model from its registered name (models made by
`dataselect.models.build_model` carry it) or from an exported program.
Selection costs (scoring wait, server compute, transfer, pushes, reports) are
accounted in `session.costs`, apart from training.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dataselect.client.batch import Batch, Chosen, Pending
from dataselect.client.costs import Costs
from dataselect.client.distributed import DistributedScorer
from dataselect.client.irreducible import fresh_copy, held_out_positions, train_irreducible
from dataselect.client.loader import SelectionLoader, SelectionSampler, as_data
from dataselect.client.pipeline import ScorerPipeline
from dataselect.client.remote import RemoteScorer
from dataselect.client.replicas import open_replicated, parse_servers
from dataselect.client.scorer import EmbeddedScorer, Scorer, SessionSpec, unwrap_model
from dataselect.errors import InvalidArgument, PluginError
from dataselect.exported import export_model
from dataselect.models import ScoringModel
from dataselect.names import MODES
from dataselect.policies import POLICIES
from dataselect.registry import get_auxiliary_loss, get_strategy
from dataselect.scoring import PoolChunk
from dataselect.strategy import AuxiliaryLoss, Progress, RunPlan

#: Overlap never asks for more than this many pools ahead.
MAX_POOLS_AHEAD = 8
#: An overlapped online run's ramp (`ramp_steps`) lasts RAMP_STEPS_PER_SELECTIVITY / fraction steps:
#: 100 at fraction 0.25, 250 at 0.1, 50 at 0.5. The more selective, the longer one-step-stale top-k
#: stays dangerous (measured: a 100-step ramp is enough at 0.25 but not at 0.1).
RAMP_STEPS_PER_SELECTIVITY = 25.0


@dataclass
class EngineOptions:
    """How an in-process (embedded) session scores; a server sets its own (`dataselect-server --help`)."""

    #: Samples per forward pass while scoring: a number, or "auto" (sized from free CUDA memory).
    micro_batch: int | str = 1024
    #: Autocast for forward signals: auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16, fp16.
    precision: str = "auto"
    #: Score in channels-last memory format: auto, on, off.
    channels_last: str = "auto"
    #: torch.compile the scoring model (slow first call).
    compile: bool = False


@dataclass
class RemoteOptions:
    """How a session talks to `dataselect-server`."""

    #: File holding the server's bearer token (default: env DATASELECT_TOKEN).
    token_file: str | None = None
    #: CA certificate (PEM) to verify a TLS server.
    tls_ca: str | None = None
    #: When the server goes away: "retry" (reconnect for `retry_seconds`, then fail) or "fallback"
    #: (then score in-process for the rest of the run).
    on_server_failure: str = "retry"
    retry_seconds: float = 60.0
    #: Dtype floating weights travel in: float32, float16, bfloat16.
    checkpoint_dtype: str = "float32"
    #: Push only the tensors that changed since the previous push.
    checkpoint_delta: bool = False


def weighted_loss(per_sample: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over the batch of `w_i * loss_i` (plain mean without weights).

    Weights are loss multipliers, deliberately not renormalised by their sum:
    importance-sampling weights `1/(N q_i)` then give an unbiased gradient and
    InfoBatch's `1/(1-r)` rescale keeps its effect.
    """
    if weights is None:
        return per_sample.mean()
    if weights.shape != per_sample.shape:
        raise InvalidArgument(f"loss weights {list(weights.shape)} do not match the batch {list(per_sample.shape)}")
    return (per_sample * weights.to(per_sample.device, per_sample.dtype)).mean()


def rows_of(pool_ids: torch.Tensor, chosen_ids: torch.Tensor) -> torch.Tensor:
    """Positions in `pool_ids` (unique) of each chosen id (repeats kept); refuses ids not in the pool."""
    pool_ids, chosen_ids = pool_ids.long().cpu(), chosen_ids.long().cpu()
    if chosen_ids.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    order = torch.argsort(pool_ids)
    sorted_ids = pool_ids[order]
    at = torch.searchsorted(sorted_ids, chosen_ids).clamp_max(len(sorted_ids) - 1)
    if not torch.equal(sorted_ids[at], chosen_ids):
        raise PluginError("the scorer returned ids that are not in the candidate pool")
    return order[at]


class Session:
    """A selection session for your own training loop; see the module docstring.

    Args:
        strategy: a registered strategy (`dataselect strategies` lists them).
        model: the `nn.Module` you train (any module mapping a batch to logits).
        fraction: share of each candidate pool (online) or of the data set (subset,
            weighted) trained on; 1.0 trains on everything and scores nothing, except
            for strategies that size their selection themselves (InfoBatch).
        options: strategy options (`{"beta": 2}`); strings as on the command line work too.
        policy: selection policy (topk, class_balanced, sample, threshold); "" = the strategy's.
        mode: online, subset or weighted; "" = the strategy's default.
        epochs: total epochs of the run (warm-up, schedules and progress depend on it).
        num_classes: classes of the task; None = the model's output width (found at first use).
        server: "HOST:PORT" of a dataselect-server ("h1:p,h2:p" for replicas); None scores in-process.
        sync_every: push the model to the scorer every this many steps (online mode).
        overlap: score the next pool while you train on this one; None = on with a server.
        ramp_steps: with overlap, the share kept from each online pool falls linearly from 1 to
            `fraction` over the first this many optimiser steps, so the one-step-stale scores never
            pick a few hard samples while the model still changes fast (see the README's overlap
            section); None = 25 / fraction steps with overlap (100 at 0.25), 0 without.
        seed: seeds the shuffles and the strategy's randomness.
        device: where in-process scoring runs; None = the model's device.
        last_layer: name of the final nn.Linear (`model.named_modules()`), for last-layer signals;
            None finds it by itself.
        remote_model: how a server builds the model: (name, kwargs) of a registered
            architecture; None = the name `build_model` gave the model.
        input_scale: score on inputs downscaled by this factor in (0, 1].
        engine, remote: `EngineOptions` / `RemoteOptions`.
        warn: called with each warning for the user (default: `warnings.warn`).
    """

    def __init__(self, strategy: str = "high_loss", model: nn.Module | None = None, *, fraction: float = 0.5,
                 options: dict[str, Any] | None = None, policy: str = "", mode: str = "", epochs: int = 1,
                 num_classes: int | None = None, server: str | None = None, sync_every: int = 1,
                 overlap: bool | None = None, ramp_steps: int | None = None, seed: int = 0,
                 device: str | torch.device | None = None,
                 last_layer: str | None = None, remote_model: tuple[str, dict] | None = None,
                 input_scale: float = 1.0, engine: EngineOptions | None = None, remote: RemoteOptions | None = None,
                 dataset: str = "", warn: Callable[[str], None] | None = None):
        if not isinstance(model, nn.Module):
            raise InvalidArgument(f"Session needs the model you train (an nn.Module), got {type(model).__name__}")
        self.strategy = strategy
        self.cls = get_strategy(strategy)
        self.model = model
        self.given_options = dict(options or {})
        self.options = self.cls.resolve_options(self.given_options)  # fails fast on a bad option
        if policy and policy not in POLICIES:
            raise InvalidArgument(f"unknown policy {policy!r}; use one of: {', '.join(POLICIES)}")
        self.policy = policy
        self.mode = mode or self.cls.default_mode
        if self.mode not in MODES:
            raise InvalidArgument(f"unknown mode {self.mode!r}; use one of: {', '.join(MODES)}")
        try:
            self.fraction = float(fraction)
        except (TypeError, ValueError):
            raise InvalidArgument(f"fraction must be a number in (0, 1], got {fraction!r}") from None
        if not 0.0 < self.fraction <= 1.0:
            raise InvalidArgument(f"fraction (--select-fraction) must be in (0, 1], got {fraction}")
        for name, value in (("epochs", epochs), ("sync_every", sync_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgument(f"{name} must be an integer >= 1, got {value!r}")
        self.epochs = epochs
        self.num_classes = num_classes
        self.server = server or None
        self.sync_every = sync_every
        self.overlap_requested = overlap
        if ramp_steps is not None and (not isinstance(ramp_steps, int) or isinstance(ramp_steps, bool)
                                       or ramp_steps < 0):
            raise InvalidArgument(f"ramp_steps must be an integer >= 0 (or None for the default), got {ramp_steps!r}")
        self.ramp_requested = ramp_steps
        #: Steps over which the kept share of online pools falls from 1 to `fraction` (set at open).
        self.ramp_steps = 0
        #: The step at which online selection started (the ramp counts from there: after any warm-up).
        self.ramp_origin: int | None = None
        self.seed = int(seed)
        self.device = None if device is None else torch.device(device)
        self.last_layer = last_layer
        self.remote_model = remote_model
        self.input_scale = float(input_scale)
        self.engine = engine or EngineOptions()
        self.remote_options = remote or RemoteOptions()
        self.dataset = dataset
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
        if self.server:
            parse_servers(self.server)  # a bad entry fails now, not at the first Select
        #: False: every sample is trained on and nothing is scored (fraction 1 and a budgeted strategy).
        self.scoring = not (self.fraction >= 1.0 and not self.cls.self_sized)
        self.costs = Costs()
        self.scorer: Scorer | None = None
        self.remote = False
        self.pipeline: ScorerPipeline | None = None
        self.dist = None  # torchrun: this rank's DistContext (see `dataselect.client.distributed`)
        #: Digest of every trained id, in order: equal digests = identical selections.
        self.digest = hashlib.sha256()
        self.steps = 0
        self.checkpoint_version = 0
        self.pushed_at_step: int | None = None
        self.version_steps: dict[int, int] = {}
        self.staleness_max = 0
        self.staleness_sum = 0
        self.staleness_count = 0
        #: Samples the finished Selects were meant to give (their budgets; for self-sized strategies the
        #: fraction of the pool) and the samples they kept: overlap sizes its look-ahead from them.
        self.budget_selected = 0
        self.kept_selected = 0
        #: Diagnostics of the Selects since `take_diagnostics`, and the latest.
        self.diagnostics: list[dict[str, Any]] = []
        self.last_diagnostics: dict[str, Any] = {}
        #: The loss term the strategy asked for (`AuxiliaryLoss`) and its built term, once the scorer said so.
        self.auxiliary: AuxiliaryLoss | None = None
        self._auxiliary_term: Callable[..., torch.Tensor] | None = None
        #: The batch the loader yielded last (what `loss` weights and reports).
        self.current: Batch | None = None
        #: Counters of the scorer from before a resume (checkpoint bytes, pushes, reconnects, resumes).
        self.counter_offset: dict[str, int] = {}
        self._deferred_report: tuple | None = None
        #: The batch sampler `take` follows, if one was made.
        self.sampler = None
        self._dataset_size = 0
        self._batch_size = 0
        self._closed = False
        #: (name, kwargs) when the model is a registered architecture (set at open).
        self._registered: tuple[str, dict] | None = None
        #: How the strategy's irreducible-loss model is trained (RHO-LOSS), set at open; None: it has none.
        self.irreducible_plan = None
        #: The irreducible-loss model's weights once trained (kept for a resumed run) and figures about it.
        self.irreducible_state: dict[str, torch.Tensor] | None = None
        self.irreducible_figures: dict[str, Any] = {}
        self._irreducible_pushed = False

    # -- opening ----------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self.scorer is not None

    def run_plan(self) -> RunPlan:
        return RunPlan(epochs=self.epochs, mode=self.mode, dataset_size=self._dataset_size,
                       batch_size=self._batch_size, select_fraction=self.fraction)

    def planned_options(self) -> dict[str, Any]:
        """The options the session opens with: the ones given, plus whatever the strategy's `plan`
        changed to fit the run (e.g. a warm-up scaled to `epochs`)."""
        resolved = self.cls.resolve_options(self.given_options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            planned = self.cls.plan(dict(resolved), self.run_plan())
        for w in caught:
            self.warn(str(w.message))
        changed = {k: v for k, v in planned.items() if k not in resolved or resolved[k] != v}
        return {**self.given_options, **changed}

    def open(self, *, dataset_size: int | None = None, batch_size: int | None = None,
             example: torch.Tensor | None = None) -> None:
        """Open the scorer now (it opens by itself at first use). `dataset_size`/`batch_size` tell the
        strategy about the run; `example` (a few inputs) lets the session learn the model's output width."""
        if self._closed:
            raise InvalidArgument("this Session is closed; make a new one")
        if dataset_size:
            self._dataset_size = int(dataset_size)
        if batch_size:
            self._batch_size = int(batch_size)
        if self.scorer is not None or not self.scoring:
            return
        self.sent_options = self.planned_options()
        self.options = self.cls.resolve_options(self.sent_options)
        num_classes = self.num_classes or self._infer_num_classes(example)
        self.num_classes = num_classes
        spec = SessionSpec(strategy=self.strategy, options=dict(self.sent_options), model_name="", model_kwargs={},
                           num_classes=num_classes, seed=self.seed, dataset=self.dataset,
                           dataset_size=self._dataset_size, policy=self.policy, input_scale=self.input_scale,
                           last_layer=self.last_layer)
        module = unwrap_model(self.model)
        registered = self.remote_model or getattr(module, "dataselect_model", None)
        if registered is not None:  # built from its name, in-process as on a server
            spec.model_name, spec.model_kwargs = registered[0], dict(registered[1])
        elif self.server:  # a server has no code for it: ship it as an exported program (data, not code)
            spec.model_name, spec.exported = self._export(module, example)
            spec.model = module  # an offline fallback scores on a copy of it in-process
        else:  # the embedded session scores on a copy of the module itself
            spec.model_name, spec.model = type(module).__name__, module
        device = self.device or _device_of(module)
        if self.dist is not None:
            self.scorer = DistributedScorer(self.dist, lambda: self._open_scorer(spec, device, registered))
        else:
            self.scorer = self._open_scorer(spec, device, registered)
        self.remote = bool(self.server)
        if self.overlap_requested if self.overlap_requested is not None else self.remote:
            self.pipeline = ScorerPipeline()
        default_ramp = math.ceil(RAMP_STEPS_PER_SELECTIVITY / self.fraction - 1e-9) if self.pipeline is not None else 0
        self.ramp_steps = default_ramp if self.ramp_requested is None else self.ramp_requested
        info = self.scorer.info
        if info.auxiliary_loss is not None:
            self.auxiliary = info.auxiliary_loss
            name, kwargs = registered if registered is not None else (None, None)
            try:
                factory = get_auxiliary_loss(self.auxiliary.name)
                self._auxiliary_term = factory(module, model_name=name, model_kwargs=kwargs,
                                               params=dict(self.auxiliary.params), device=device)
            except InvalidArgument as exc:
                raise InvalidArgument(f"strategy {self.strategy!r} asks the trainer for the auxiliary loss "
                                      f"{self.auxiliary.name!r}: {exc}") from None
        self._registered = registered
        self.irreducible_plan = self.cls.irreducible_training(self.options)
        if (self.irreducible_plan is not None) != ("irreducible_loss" in info.signals):
            raise PluginError(f"strategy {self.strategy!r} must both ask for the signal irreducible_loss and say how "
                              "its model is trained (Strategy.irreducible_training), or neither")

    @property
    def needs_irreducible(self) -> bool:
        """True while the strategy's irreducible-loss model has not reached the scorer."""
        return self.irreducible_plan is not None and not self._irreducible_pushed

    def fit_irreducible(self, dataset: Any, *, batch_size: int = 64) -> dict[str, Any]:
        """Train the irreducible-loss model the strategy asks for (RHO-LOSS) on its held-out share of
        `dataset` and push it to the scorer; returns figures about the training.

        `session.loader` and `session.batch_sampler` call this by themselves before the first selection;
        call it yourself only when you select with `session.select`. A fresh copy of your model trains
        (see `dataselect.client.irreducible`); its time is a selection cost (`costs.irreducible_seconds`,
        also within `costs.score_seconds`). A resumed session pushes the weights it saved instead."""
        if not self.is_open:
            self.open()
        plan = self.irreducible_plan
        if plan is None:
            raise InvalidArgument(f"strategy {self.strategy!r} uses no irreducible-loss model")
        t0 = time.perf_counter()
        if self.irreducible_state is None and (self.dist is None or self.dist.is_main):
            data = dataset if callable(getattr(dataset, "batches", None)) else as_data(dataset)
            module = unwrap_model(self.model)
            fresh = fresh_copy(module, self._registered, self.seed)
            positions = held_out_positions(data, plan.share, self.seed)
            self.irreducible_state, self.irreducible_figures = train_irreducible(
                fresh, data, positions, plan, batch_size=batch_size, seed=self.seed, device=_device_of(module))
        if self.irreducible_state is not None:
            self.drain()
            self.scorer.push_irreducible(self.irreducible_state)
        self._irreducible_pushed = True
        spent = time.perf_counter() - t0
        self.costs.irreducible_seconds += spent
        self.costs.score_seconds += spent
        return dict(self.irreducible_figures)

    def _export(self, module: nn.Module, example: torch.Tensor | None) -> tuple[str, bytes]:
        """The module as a `torch.export` archive for a server, and the name it goes by there."""
        if example is None:
            raise InvalidArgument(
                f"scoring {type(module).__name__} on a server ships it as an exported program, which needs an example "
                "input: call session.open(example=inputs[:2]) first (loaders and select() pass one themselves), or "
                "register the architecture by name (dataselect.models.build_model / remote_model=(name, kwargs))")
        x = example[:2].to(_device_of(module))
        archive = export_model(module, x, last_layer=self.last_layer)
        return f"exported:{hashlib.sha256(archive).hexdigest()[:12]}", archive

    def _open_scorer(self, spec: SessionSpec, device: torch.device, registered) -> Scorer:
        if not self.server:
            e = self.engine
            return EmbeddedScorer(spec, device=device, micro_batch=e.micro_batch, precision=e.precision,
                                  channels_last=e.channels_last, compile=e.compile)
        r = self.remote_options
        if "," in self.server:
            return open_replicated(_RemoteConfig(self.server, r), spec, device)
        return RemoteScorer(self.server, spec, token_file=r.token_file, tls_ca=r.tls_ca,
                            retry_seconds=r.retry_seconds, on_server_failure=r.on_server_failure,
                            fallback_device=device, checkpoint_dtype=r.checkpoint_dtype,
                            checkpoint_delta=r.checkpoint_delta)

    def _infer_num_classes(self, example: torch.Tensor | None) -> int:
        module = unwrap_model(self.model)
        last = None
        if self.last_layer is not None:
            last = dict(module.named_modules()).get(self.last_layer)
        elif isinstance(getattr(module, "classifier", None), nn.Linear):
            last = module.classifier
        if isinstance(last, nn.Linear):
            return int(last.out_features)
        if example is None:
            linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise InvalidArgument("the session cannot tell how many classes the model predicts: pass num_classes=")
            return int(linears[-1].out_features)  # the last layer registered: right for Sequential and most nets
        was_training = module.training
        module.eval()
        try:
            with torch.inference_mode():
                z = ScoringModel(module).logits(example[:2].to(_device_of(module)))
        finally:
            module.train(was_training)
        if z.dim() != 2:
            raise InvalidArgument(f"the model returned {list(z.shape)}; it must return logits [N, num_classes]")
        return int(z.shape[1])

    # -- what the strategy needs -----------------------------------------------------------
    @property
    def info(self):
        return None if self.scorer is None else self.scorer.info

    @property
    def needs_inputs(self) -> bool:
        """True when the strategy scores with the model (its pools carry inputs, the model is pushed)."""
        return self.scorer is not None and bool(self.scorer.info.signals)

    @property
    def uses_reports(self) -> bool:
        return self.scorer is not None and bool(self.scorer.info.uses_reports)

    @property
    def warmup_epochs(self) -> float:
        """Full-data epochs before selecting (the strategy's `warmup_epochs` option), 0 without scoring."""
        if not self.scoring:
            return 0.0
        return float(self.options.get("warmup_epochs", 0) or 0)

    @property
    def refresh(self) -> int:
        return int(self.options.get("refresh", 1) or 1)

    @property
    def static(self) -> bool:
        return bool(getattr(self.cls, "static", False))

    def budget_for(self, pool_size: int, fraction: float | None = None) -> int:
        """The budget of a pool: the whole pool for self-sized strategies, else round(pool × fraction),
        at least 1; `fraction` defaults to the current one (`fraction` once any ramp is over)."""
        if self.cls.self_sized:
            return max(1, pool_size)
        return max(1, round(pool_size * (self.current_fraction() if fraction is None else fraction)))

    def fraction_at(self, step: int) -> float:
        """The share of an online pool kept at optimiser step `step`: `fraction`, or during the first
        `ramp_steps` steps of online selection (counted from its first pool, so after any full-data
        warm-up) a share falling linearly from 1 to it."""
        if self.mode != "online" or not self.ramp_steps:
            return self.fraction
        done = step - (self.steps if self.ramp_origin is None else self.ramp_origin)
        if done >= self.ramp_steps:
            return self.fraction
        return self.fraction + (1.0 - self.fraction) * (1.0 - max(0, done) / self.ramp_steps)

    def start_ramp(self) -> None:
        """Online selection starts now (the first pool): the ramp counts from this step."""
        if self.ramp_origin is None:
            self.ramp_origin = self.steps

    def current_fraction(self) -> float:
        return self.fraction_at(self.steps)

    def progress(self, epoch: int, within: float) -> Progress:
        """Progress at 1-based `epoch`, `within` of it done (the strategies see 0-based epochs)."""
        return Progress(epoch=epoch - 1, step=self.steps, total_epochs=self.epochs,
                        fraction=((epoch - 1) + within) / self.epochs)

    # -- pushes, selections, reports -----------------------------------------------------------
    def push(self) -> None:
        """Send the model's current weights to the scorer (inline, or queued before later Selects)."""
        if self.scorer is None:
            return
        self.checkpoint_version += 1
        self.pushed_at_step = self.steps
        self.version_steps[self.checkpoint_version] = self.steps
        module = unwrap_model(self.model)
        t0 = time.perf_counter()
        if self.pipeline is not None:
            snapshot = {k: v.detach().clone() for k, v in module.state_dict().items()}
            self.pipeline.submit("push", self.scorer.push_state, snapshot, self.checkpoint_version, self.steps)
            self.costs.checkpoint_seconds += time.perf_counter() - t0
            return
        self.scorer.push_checkpoint(module, self.checkpoint_version, self.steps)
        elapsed = time.perf_counter() - t0
        self.costs.checkpoint_seconds += elapsed
        if self.remote:
            self.costs.transfer_seconds += elapsed

    def step(self) -> None:
        """Count one optimiser step of your own loop (after `optimizer.step()`): the batch `loss` weighted
        is recorded and its report sent, and the model is pushed every `sync_every` steps.
        (`session.loader` does this by itself; call it with `select`/`take` in a loop of your own.)"""
        batch = self.current
        self.current = None
        self.finish_batch(batch)
        self.push_if_due()

    def finish_batch(self, batch: Batch | None) -> None:
        """A batch was trained on: send its deferred report, record its ids, count the step."""
        self.flush_report()
        if batch is not None:
            self.record(batch.ids)
            self.costs.samples_trained += int(batch.targets.shape[0])
        self.steps += 1
        self.costs.steps = self.steps

    def push_if_due(self) -> None:
        """Online selection: push the model every `sync_every` steps."""
        if self.needs_inputs and self.steps % self.sync_every == 0:
            self.push()

    def request(self, ids: torch.Tensor, inputs: torch.Tensor | None, targets: torch.Tensor, budget: int,
                progress: Progress, *, fresh_model: bool = False, keep: float | None = None) -> Pending:
        """Ask for a Select of the pool (`inputs` may be None for strategies that need no forward pass).

        `fresh_model`: push the current weights first unless the scorer has them (whole-set
        selections); otherwise only the first Select pushes, and `step` pushes every
        `sync_every` steps. With overlap the call is queued and this returns at once. `keep`: during
        the ramp, the share a self-sized strategy's selection is topped up to (default: the current one).
        """
        if self.scorer is None:
            self.open(example=inputs)
        if not fresh_model:
            self.start_ramp()
        if self.needs_inputs and (self.pushed_at_step is None or (fresh_model and self.pushed_at_step != self.steps)):
            self.push()
        send = inputs if self.needs_inputs else None
        ids, targets = ids.long(), targets.long()
        keep = self.current_fraction() if keep is None else keep
        keep = keep if self.cls.self_sized and keep > self.fraction else 0.0
        if self.pipeline is not None:
            future = self.pipeline.submit("select", self.scorer.select, ids, send, targets, budget, progress)
            return Pending(ids, budget, keep, future=future)
        t0 = time.perf_counter()
        reply = self.scorer.select(ids, send, targets, budget, progress)
        return Pending(ids, budget, keep, reply=reply, seconds=time.perf_counter() - t0)

    def wait(self, pending: Pending) -> Chosen:
        """The selection of a requested pool (waits for it); its cost is accounted."""
        reply, waited = pending.reply, pending.seconds
        if pending.future is not None:
            t0 = time.perf_counter()
            reply = self.pipeline.wait("select", pending.future).value
            waited = time.perf_counter() - t0
        costs = self.costs
        costs.score_seconds += waited  # the trainer's wait: all of it inline, the unhidden part overlapped
        costs.server_compute_seconds += reply.server_compute_seconds
        costs.transfer_seconds += reply.transfer_seconds
        costs.samples_scored += int(reply.samples_scored)
        if reply.diagnostics:
            self.diagnostics.append(reply.diagnostics)
            self.last_diagnostics = reply.diagnostics
        if reply.checkpoint_version in self.version_steps:
            # The selection trains at the next step; the model that chose it is this many steps older.
            stale = self.steps - self.version_steps[reply.checkpoint_version]
            self.staleness_max = max(self.staleness_max, stale)
            self.staleness_sum += stale
            self.staleness_count += 1
        chosen = reply.selected_ids.long()
        weights = reply.weights
        if weights is not None and weights.numel() != chosen.numel():
            raise PluginError(f"strategy {self.strategy!r} returned {weights.numel()} weights for "
                              f"{chosen.numel()} selected samples")
        rows = rows_of(pending.ids, chosen)
        if pending.keep:
            rows, chosen, weights = self._top_up(pending.ids, rows, weights, pending.keep)
        # What the pool was meant to give (one batch for a loader's pool) against what it gave.
        n = int(pending.ids.numel())
        self.budget_selected += round(n * max(pending.keep, self.fraction)) if self.cls.self_sized else pending.budget
        self.kept_selected += int(chosen.numel())
        return Chosen(rows=rows, ids=chosen, weights=weights)

    def _top_up(self, pool_ids: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor | None, keep: float):
        """During the ramp, a self-sized strategy's selection (Selective Backprop's) is topped up with a
        uniform draw from the rest of the pool to the ramp's share `keep`, as budgets are for the others."""
        n = int(pool_ids.numel())
        want = round(n * keep) - int(rows.numel())
        if want <= 0:
            return rows, pool_ids[rows], weights
        rest = torch.ones(n, dtype=torch.bool)
        rest[rows] = False
        others = torch.nonzero(rest, as_tuple=True)[0]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.steps)
        extra = others[torch.randperm(others.numel(), generator=g)[:want]]
        rows = torch.cat([rows, extra])
        if weights is not None:
            weights = torch.cat([weights, torch.ones(extra.numel(), dtype=weights.dtype)])
        return rows, pool_ids[rows], weights

    def select_chunks(self, chunks: Iterable[Any], budget: int, progress: Progress) -> Chosen:
        """One Select over a pool that arrives in pieces (`dataselect.scoring.PoolChunk`s: a data set
        streamed from disk), with the current weights; `Chosen.rows` index the concatenated pool."""
        if self.scorer is None:
            self.open()
        if self.needs_inputs and self.pushed_at_step != self.steps:
            self.push()
        seen: list[torch.Tensor] = []

        def recorded():
            for chunk in chunks:
                seen.append(chunk.ids.long())
                yield chunk

        scorer = self.scorer
        if hasattr(scorer, "select_chunks"):
            call = (scorer.select_chunks, recorded(), budget, progress)
        else:  # transports that take one pool: gather it first
            parts = list(recorded())
            pool = PoolChunk(ids=torch.cat([c.ids for c in parts]), labels=torch.cat([c.labels.long() for c in parts]),
                             inputs=None if parts[0].inputs is None else torch.cat([c.inputs for c in parts]))
            call = (scorer.select, pool.ids, pool.inputs, pool.labels, budget, progress)
        t0 = time.perf_counter()
        if self.pipeline is not None:  # ordered behind the queued pushes
            reply = self.pipeline.wait("select", self.pipeline.submit("select", *call)).value
        else:
            reply = call[0](*call[1:])
        ids = torch.cat(seen) if seen else torch.empty(0, dtype=torch.long)
        return self.wait(Pending(ids, budget, reply=reply, seconds=time.perf_counter() - t0))

    def cancel(self, pending: Iterable[Pending]) -> None:
        """Drop Selects asked for ahead that will not be used (a stopped epoch)."""
        for p in pending:
            if p.future is not None:
                p.future.cancel()

    def select(self, inputs: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor | None = None, *,
               budget: int | None = None, progress: Progress | None = None) -> Chosen:
        """Choose from one candidate pool of your own: returns the rows to train on and their weights.

        `ids` are the samples' data set indices (strategies keep per-sample state by them); without
        them the pool's rows are numbered by a running counter, which suits stateless strategies only.
        `budget` defaults to the session's fraction of the pool.
        """
        n = int(targets.shape[0])
        if ids is None:
            ids = torch.arange(self.costs.samples_scored, self.costs.samples_scored + n)
        ids = torch.as_tensor(ids).long()
        if ids.shape != (n,):
            raise InvalidArgument(f"ids {list(ids.shape)} must be one per pool sample ({n})")
        if self.scorer is None:
            self.open(example=inputs)
        return self.wait(self.request(ids, inputs, targets, budget or self.budget_for(n),
                                      progress or self.progress(1, 0.0)))

    def report(self, ids: torch.Tensor, losses: torch.Tensor, *, logits: torch.Tensor | None = None,
               targets: torch.Tensor | None = None, progress: Progress | None = None) -> None:
        """Hand the training forward pass's per-sample losses to the strategy (a no-op if it does not use them).

        With `logits` and `targets` the true-class probability and correctness go along too.
        """
        if not self.uses_reports:
            return
        self._report_now(ids, losses.detach(), None if logits is None else logits.detach(), targets,
                         progress or self.progress(1, 0.0))

    def _send_report(self, ids, losses, true_p, correct, progress) -> None:
        t0 = time.perf_counter()
        if self.pipeline is not None:
            self.pipeline.submit("report", self.scorer.report, ids, losses, true_p, correct, progress)
        else:
            self.scorer.report(ids, losses, true_p, correct, progress)
        self.costs.report_seconds += time.perf_counter() - t0

    def loss(self, logits: torch.Tensor, targets: torch.Tensor | None = None, *, batch: Batch | None = None,
             inputs: torch.Tensor | None = None) -> torch.Tensor:
        """The loss to backpropagate for the current batch: per-sample cross-entropy of `logits`
        against `targets` (or `logits` itself when it is already a vector of per-sample losses and
        `targets` is None), times the selection's weights, averaged; plus any auxiliary term the
        strategy asks for (`AuxiliaryLoss`, e.g. DynaMS's proxy; computed on `inputs`, default the batch's). Reports the
        per-sample losses to strategies that learn from them."""
        batch = batch if batch is not None else self.current
        if targets is None:
            if logits.dim() != 1:
                raise InvalidArgument("loss(logits) without targets needs per-sample losses [N]; "
                                      "pass targets to get cross-entropy")
            per_sample, scores = logits, None
        else:
            scores = logits
            per_sample = F.cross_entropy(logits.float(), targets, reduction="none")
        weights = None if batch is None else batch.weights
        loss = weighted_loss(per_sample, weights)
        if self._auxiliary_term is not None and targets is not None:
            x = inputs if inputs is not None else batch.inputs.to(targets.device)
            term = self._auxiliary_term(unwrap_model(self.model), x, targets)
            loss = loss + float(self.auxiliary.weight) * weighted_loss(term, weights)
        if batch is not None and self.uses_reports:
            report = (batch.ids, per_sample.detach(), None if scores is None else scores.detach(), targets,
                      batch.progress)
            if batch is self.current:
                # A loader's batch: sent once the loop comes back for the next one, i.e. after the optimiser
                # step, so the reporting time stays out of the training step.
                self._deferred_report = report
            else:
                self._report_now(*report)
        return loss

    def flush_report(self) -> None:
        """Send the report `loss` kept for the batch just trained on (the loader calls this)."""
        report, self._deferred_report = self._deferred_report, None
        if report is not None:
            self._report_now(*report)

    def _report_now(self, ids, per_sample, logits, targets, progress) -> None:
        true_p = correct = None
        if logits is not None and targets is not None:
            with torch.no_grad():
                probs = logits.float().softmax(1)
                y = targets.to(probs.device).long()
                true_p = probs.gather(1, y.unsqueeze(1)).squeeze(1).cpu()
                correct = (probs.argmax(1) == y).cpu()
        self._send_report(torch.as_tensor(ids).long().cpu(), per_sample.float().cpu(), true_p, correct, progress)

    def record(self, ids: torch.Tensor) -> None:
        """Add trained ids to the selection digest."""
        self.digest.update(ids.long().cpu().numpy().tobytes())

    def pools_per_batch(self) -> int:
        """Pools it takes to fill a batch, from the share of its budgets the strategy kept so far
        (a full pool's budget is one batch): 1 for exact budgets, about 2 for Selective Backprop
        keeping half, so overlap asks for enough pools ahead."""
        if self.budget_selected == 0 or self.kept_selected == 0:
            return 1
        return max(1, min(MAX_POOLS_AHEAD, math.ceil(self.budget_selected / self.kept_selected - 1e-9)))

    def take_diagnostics(self) -> list[dict[str, Any]]:
        out, self.diagnostics = self.diagnostics, []
        return out

    # -- the loaders --------------------------------------------------------------------------
    def loader(self, dataset: Any, batch_size: int = 64, **kwargs) -> "SelectionLoader":
        """An iterable over one epoch of the strategy's choice of `dataset` at a time; see `SelectionLoader`."""
        return SelectionLoader(self, dataset, batch_size=batch_size, **kwargs)

    def batch_sampler(self, dataset: Any, batch_size: int = 64, **kwargs) -> "SelectionSampler":
        """Index batches for a DataLoader of your own over `dataselect.WithIds(dataset)`; see `SelectionSampler`."""
        return SelectionSampler(self, dataset, batch_size=batch_size, **kwargs)

    def take(self, inputs: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor) -> Batch:
        """The samples to train on from a batch of `batch_sampler`'s DataLoader: in online mode the rows the
        strategy chose from the candidate pool (scored now, with the current model), otherwise the batch
        itself with its selection weights. Returns a `Batch` (unpacks as inputs, targets) that `loss` weights."""
        sampler = self.sampler
        if sampler is None:
            raise InvalidArgument("take() goes with session.batch_sampler(...); with session.loader(...) the batches "
                                  "are already chosen")
        kind, i, n, weights = sampler.position
        epoch = sampler.loader.epoch
        ids = torch.as_tensor(ids).long().cpu()
        if kind == "online":
            send = inputs if self.needs_inputs else None
            chosen = self.wait(self.request(ids, send, targets.cpu(), self.budget_for(len(ids)),
                                            self.progress(epoch, i / n)))
            rows = chosen.rows.to(targets.device)
            inputs, targets, ids, weights = inputs[rows], targets[rows], ids[chosen.rows], chosen.weights
            within = (i + 1) / n
        else:
            within = i / n
        self.current = Batch(inputs, targets, ids, weights, self.progress(epoch, within))
        return self.current

    # -- state -------------------------------------------------------------------------------
    def drain(self) -> None:
        """Wait for background pushes and reports (overlap) to finish."""
        if self.pipeline is not None:
            self.pipeline.drain()

    def close(self) -> None:
        """Finish background calls and end the scoring session; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.pipeline is not None:
                self.pipeline.close(wait=True)
        finally:
            if self.scorer is not None:
                self.scorer.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def counters(self) -> dict[str, Any]:
        """Scorer counters (checkpoint bytes and pushes, reconnects, fallback, replicas), resumes included."""
        c = self.scorer.counters if self.scorer is not None else None
        off = self.counter_offset
        out: dict[str, Any] = {
            "checkpoint_bytes": (c.checkpoint_bytes if c else 0) + off.get("checkpoint_bytes", 0),
            "checkpoint_pushes": (c.checkpoint_pushes if c else 0) + off.get("checkpoint_pushes", 0),
            "reconnects": (c.reconnects if c else 0) + off.get("reconnects", 0),
            "resumes": off.get("resumes", 0),
            "fallback": bool(c.extra.get("fallback")) if c else False,
        }
        if c and "replicas" in c.extra:  # replicas configured, live, down, revived
            out["replicas"] = {k: v for k, v in c.extra.items() if k.startswith("replica")}
        return out

    def overlap_figures(self) -> dict[str, Any]:
        """How stale the scoring model was and how much scoring the overlap hid (see the README)."""
        pipe = self.pipeline
        return {
            "overlap": pipe is not None,
            "sync_every": self.sync_every,
            "staleness_max_steps": self.staleness_max,
            "staleness_mean_steps": self.staleness_sum / self.staleness_count if self.staleness_count else 0.0,
            "hidden_score_fraction": pipe.hidden_fraction("select") if pipe is not None else 0.0,
            "background_score_seconds": pipe.busy_seconds.get("select", 0.0) if pipe is not None else 0.0,
            "background_checkpoint_seconds": pipe.busy_seconds.get("push", 0.0) if pipe is not None else 0.0,
            "background_report_seconds": pipe.busy_seconds.get("report", 0.0) if pipe is not None else 0.0,
            "checkpoint_dtype": self.remote_options.checkpoint_dtype if self.remote else "float32",
            "checkpoint_delta": bool(self.remote_options.checkpoint_delta and self.remote),
        }

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (plain data): counters, digest, versions, costs."""
        return {"steps": self.steps, "checkpoint_version": self.checkpoint_version, "ramp_origin": self.ramp_origin,
                "selection_sha256": self.digest.hexdigest(), "costs": _as_dict(self.costs),
                "irreducible": self.irreducible_state,
                "counters": {k: v for k, v in self.counters().items() if k in ("checkpoint_bytes", "checkpoint_pushes",
                                                                                "reconnects", "resumes")}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        origin = state.get("ramp_origin")
        self.ramp_origin = None if origin is None else int(origin)
        self.checkpoint_version = int(state.get("checkpoint_version", 0))
        self.digest.update(str(state["selection_sha256"]).encode())
        self.costs = Costs(**{k: v for k, v in state.get("costs", {}).items() if k in _COST_FIELDS})
        self.counter_offset = dict(state.get("counters", {}))
        self.counter_offset["resumes"] = self.counter_offset.get("resumes", 0) + 1
        if state.get("irreducible") is not None:
            self.irreducible_state = dict(state["irreducible"])


_COST_FIELDS = {f.name for f in fields(Costs)}


def _as_dict(costs: Costs) -> dict[str, Any]:
    return {f.name: getattr(costs, f.name) for f in fields(costs)}


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


@dataclass
class _RemoteConfig:
    """What `open_replicated` reads."""

    server: str
    options: RemoteOptions = field(default_factory=RemoteOptions)

    def __getattr__(self, name: str) -> Any:
        if name == "options":
            raise AttributeError(name)
        return getattr(self.options, name)
