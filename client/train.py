"""The training loop and its cost accounting.

`train(TrainConfig(...))` trains a registry model on a dataset, choosing its
training samples through a scorer (embedded in-process, or remote with
`server=HOST:PORT`), and returns a summary dict with the cost split:

* `train_seconds`: forward + backward + optimiser on the selected samples,
  device-synchronised — the cost a user pays for training itself;
* `score_seconds`: wall time the trainer waited for Select calls;
* `server_compute_seconds`: what the scorer measured for its own compute
  (embedded: the in-process compute; remote: the server's figure);
* `transfer_seconds`: encoding and wire time of Select replies, plus
  checkpoint pushes when the scorer is remote;
* `checkpoint_seconds`, `eval_seconds`, `data_seconds`.

* `report_seconds`: time spent handing training-side statistics to the
  scorer (strategies with `uses_reports`).

Modes (`EPOCH_RUNNERS`; the strategy names its default, `--mode` overrides):

* `online`: every step a pool of `ceil(batch / select_fraction)` candidates
  is scored; selections accumulate until a full batch is ready (selective
  backprop keeps a variable number per pool), the remainder is flushed at
  the epoch's end. An epoch is one pass of candidates over the training set.
* `subset`: the whole training set is scored in one Select (budget
  `round(N × fraction)`) at the first epoch after warm-up and every `refresh`
  epochs after (once for `static` strategies such as MRMC); epochs train on
  shuffled mini-batches of the subset, with its weights.
* `weighted`: every epoch, `round(N × fraction)` draws (with replacement for
  importance sampling) over the whole set, each draw trained on, with weights.

Warm-up (strategy option `warmup_epochs`): that many full-data epochs first,
in any mode, reporting training losses; they count in --epochs and in every
cost total. Budgets (`budget_seconds`, `budget_samples`) stop training before
the next step once spent; the run then evaluates and writes its summary with
`stopped_by`, and metrics.jsonl gets a line for the partial epoch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dataselect.checkpoint import CHECKPOINT_DTYPES, load_checkpoint, load_state, make_checkpoint, save_checkpoint
from dataselect.client.data import Dataset, Split, load_dataset
from dataselect.client.pipeline import ScorerPipeline
from dataselect.client import distributed as _distributed
from dataselect.client.scorer import EmbeddedScorer, Scorer, SessionSpec
from dataselect.engine import resolve_device, synchronize
from dataselect.errors import InvalidArgument, PluginError
from dataselect.models import build_model
from dataselect.plugins import get_model_builder, get_selector
from dataselect.plugins.base import MODES, Progress
from dataselect.plugins.policies import POLICIES
from dataselect.proxy import build_proxy, proxy_logits


@dataclass
class TrainConfig:
    strategy: str = "high_loss"
    #: Strategy options as given (CLI strings or JSON values); the strategy validates them.
    options: dict[str, Any] = field(default_factory=dict)
    #: Selection policy; "" = the strategy's default.
    policy: str = ""
    #: online | subset | weighted; "" = the strategy's default.
    mode: str = ""
    dataset: str = "mnist"
    data_dir: str | None = None
    download: bool = True
    model: str = "cnn-small"
    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    #: Fraction of each candidate pool trained on; 1.0 = full data, no scoring.
    select_fraction: float = 0.5
    seed: int = 0
    device: str = "auto"
    #: torch CPU threads; None leaves torch's own choice.
    threads: int | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    output: str | None = None
    server: str | None = None
    #: Online mode: push the checkpoint to the scorer every N optimiser steps.
    #: Subset and weighted modes push once before each whole-set selection instead
    #: (the scorer's copy is not used in between).
    sync_every: int = 1
    #: Micro-batch for scoring (embedded) and evaluation.
    micro_batch: int = 1024
    init_from: str | None = None
    #: Per-epoch progress bar (still only drawn on a terminal).
    progress: bool = True
    #: Stop training once this many seconds have passed (wall clock less dataset
    #: loading and evaluation); None = no limit.
    budget_seconds: float | None = None
    #: Stop training once this many samples have been trained on; None = no limit.
    budget_samples: int | None = None
    #: Remote scoring: bearer token file (else $DATASELECT_TOKEN), CA for TLS.
    token_file: str | None = None
    tls_ca: str | None = None
    #: Remote scoring: "retry" (reconnect with backoff for `retry_seconds`, then fail)
    #: or "fallback" (then score in-process for the rest of the run).
    on_server_failure: str = "retry"
    retry_seconds: float = 60.0
    #: Overlapped scoring: request pool t+1's selection before training step t, and push
    #: checkpoints in the background. None = on with a remote server, off embedded.
    overlap: bool | None = None
    #: Remote scoring: dtype floating weights travel in (float32, float16, bfloat16).
    checkpoint_dtype: str = "float32"
    #: Remote scoring: push only the tensors that changed since the previous push.
    checkpoint_delta: bool = False
    #: Also evaluate every this many trained samples (time-to-accuracy at a finer grain than epochs).
    eval_every: int | None = None
    #: Stop once test accuracy reaches this (at an epoch's end or an --eval-every point).
    target_accuracy: float | None = None
    #: Score on inputs downscaled by this factor in (0, 1] (embedded and remote).
    score_input_scale: float = 1.0
    #: Embedded scoring: autocast for forward signals (auto|fp32|bf16|fp16) and torch.compile.
    score_precision: str = "auto"
    score_compile: bool = False


@dataclass
class Costs:
    """Seconds and counts accumulated over a run."""

    train_seconds: float = 0.0
    score_seconds: float = 0.0
    server_compute_seconds: float = 0.0
    transfer_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    eval_seconds: float = 0.0
    data_seconds: float = 0.0
    report_seconds: float = 0.0
    samples_trained: int = 0
    samples_scored: int = 0
    steps: int = 0
    #: Whole-training-set selections (subset and weighted modes).
    refreshes: int = 0
    #: Epochs trained on the full data (warm-up, or no scorer).
    full_data_epochs: int = 0


@dataclass
class _Run:
    """State shared by the epoch runners of one training run."""

    config: TrainConfig
    data: Dataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    scorer: Scorer | None
    remote: bool
    costs: Costs
    shuffle: torch.Generator
    #: Digest of every selected id in order: equal digests = identical selections.
    selection_digest: Any = field(default_factory=hashlib.sha256)
    #: torchrun: this rank's DistContext, and the DistributedDataParallel model that training
    #: steps run (evaluation, pushes and resume points use the unwrapped `model`). None: one process.
    dist: Any = None
    ddp: Any = None
    checkpoint_version: int = 0
    #: Optimiser step at the last checkpoint push (None: never pushed).
    pushed_at_step: int | None = None
    #: Full-data epochs before the mode starts (the strategy's `warmup_epochs` option).
    warmup_epochs: int = 0
    #: Subset mode: re-select every this many epochs; `static`: select once.
    refresh: int = 1
    static: bool = False
    #: The current whole-set selection: (positions, weights or None).
    selection: tuple[torch.Tensor, torch.Tensor | None] | None = None
    last_selection_size: int = 0
    t_start: float = 0.0
    #: Dataset loading time, kept out of the --budget-seconds clock.
    load_seconds: float = 0.0
    #: Scorer counters from before a resume (checkpoint_bytes, pushes, reconnects).
    counter_offset: dict[str, int] = field(default_factory=dict)
    #: Overlapped scoring: the worker that runs every scorer call (None: calls are made inline).
    pipeline: ScorerPipeline | None = None
    #: Optimiser step of each pushed checkpoint version (staleness of the model a selection used).
    version_steps: dict[int, int] = field(default_factory=dict)
    #: Staleness in optimiser steps of the scoring model, over the selections trained on.
    staleness_max: int = 0
    staleness_sum: int = 0
    staleness_count: int = 0
    #: Budgets of the Selects finished and the samples they kept (overlap sizes its look-ahead from them).
    budget_selected: int = 0
    kept_selected: int = 0
    #: --eval-every: samples_trained at which the next evaluation is due, and the points so far.
    next_eval: int = 0
    eval_points: list[dict[str, Any]] = field(default_factory=list)
    #: --target-accuracy: training seconds (budget clock) and samples when it was first reached.
    target_seconds: float | None = None
    target_samples: int | None = None
    target_cpu_seconds: float | None = None
    #: This process's CPU time when training began, and the CPU time evaluations took since.
    cpu_start: float = field(default_factory=time.process_time)
    eval_cpu: float = 0.0
    #: DynaMS PSP: the model's slim sub-network, trained jointly with loss weight `proxy_weight`
    #: (its parameters are views of the model's; None: no proxy).
    proxy: nn.Module | None = None
    proxy_weight: float = 0.0
    #: Diagnostics of the Selects since the last epoch line (e.g. the proxy's rank correlation), and the latest.
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    last_diagnostics: dict[str, Any] = field(default_factory=dict)


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


def validate_config(config: TrainConfig) -> str:
    """Check everything that needs no data or model; returns the training mode.

    Runs before any data is loaded so a typo fails in milliseconds.
    """
    cls = get_selector(config.strategy)
    cls.resolve_options(config.options)
    if config.server and "," in config.server:
        from dataselect.client.replicas import parse_servers

        parse_servers(config.server)  # a bad entry fails before any data is loaded
    get_model_builder(config.model)
    if config.policy and config.policy not in POLICIES:
        raise InvalidArgument(f"unknown policy {config.policy!r}; use one of: {', '.join(POLICIES)}")
    mode = config.mode or cls.default_mode
    if mode not in MODES:
        raise InvalidArgument(f"unknown mode {mode!r}; use one of: {', '.join(MODES)}")
    if not 0.0 < config.select_fraction <= 1.0:
        raise InvalidArgument(f"--select-fraction must be in (0, 1], got {config.select_fraction}")
    for name in ("epochs", "batch_size", "sync_every", "micro_batch"):
        if getattr(config, name) < 1:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.lr <= 0:
        raise InvalidArgument(f"--lr must be > 0, got {config.lr}")
    if not 0.0 < config.score_input_scale <= 1.0:
        raise InvalidArgument(f"--score-input-scale must be in (0, 1] (0.5 = half height and width), "
                              f"got {config.score_input_scale}")
    from dataselect.engine import PRECISIONS

    if config.score_precision not in PRECISIONS:
        raise InvalidArgument(f"--score-precision must be one of {', '.join(PRECISIONS)}, got {config.score_precision!r}")
    if config.threads is not None and config.threads < 1:
        raise InvalidArgument(f"--threads must be >= 1, got {config.threads}")
    if config.budget_seconds is not None and not config.budget_seconds > 0:
        raise InvalidArgument(f"--budget-seconds must be > 0, got {config.budget_seconds}")
    if config.budget_samples is not None and config.budget_samples < 1:
        raise InvalidArgument(f"--budget-samples must be >= 1, got {config.budget_samples}")
    if config.eval_every is not None and config.eval_every < 1:
        raise InvalidArgument(f"--eval-every must be >= 1 samples, got {config.eval_every}")
    if config.target_accuracy is not None and not 0.0 < config.target_accuracy <= 1.0:
        raise InvalidArgument(f"--target-accuracy is a fraction in (0, 1], got {config.target_accuracy}; e.g. 0.99")
    if config.checkpoint_dtype not in CHECKPOINT_DTYPES:
        raise InvalidArgument(f"--checkpoint-dtype must be one of {', '.join(CHECKPOINT_DTYPES)}, "
                              f"got {config.checkpoint_dtype!r}")
    return mode


RESUME_FILE = "checkpoint.pt"


def resume(output: str | Path, *, server: str | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Continue a run from the checkpoint it wrote at its last finished epoch in `output`.

    The model, optimiser, shuffling generator, costs and per-epoch metrics are
    restored, so the resumed run's figures cover the whole run. The strategy's
    per-sample state (e.g. loss histories) is not part of the trainer's
    checkpoint and starts afresh, as after a server restart. `server` replaces
    the saved server address (the server may have moved).
    """
    path = Path(output) / RESUME_FILE
    if not path.is_file():
        raise InvalidArgument(f"--resume {output}: no {RESUME_FILE} there; resume needs the --output DIR of an earlier run")
    ckpt = load_checkpoint(path)
    state, saved = ckpt.get("resume"), ckpt.get("config")
    if not isinstance(state, dict) or not isinstance(saved, dict):
        raise InvalidArgument(f"--resume {output}: {RESUME_FILE} was not written by dataselect-train (no resume state)")
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    config.output = str(output)
    if server is not None:
        config.server = server
    if state["epoch"] >= config.epochs:
        raise InvalidArgument(f"--resume {output}: the run already finished all {config.epochs} epoch(s); see its summary.json")
    return train(config, log=log, _resume=ckpt)


def train(config: TrainConfig, *, log: Callable[[str], None] | None = None,
          _resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, evaluate each epoch, and return the summary (also written under `config.output`)."""
    t_start = time.perf_counter()
    mode = validate_config(config)
    dist_ctx = _distributed.setup(config, resuming=_resume is not None)  # torchrun: join the process group
    if dist_ctx is not None and not dist_ctx.is_main:
        log = None  # rank 0 speaks for the run
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = dist_ctx.device if dist_ctx is not None else resolve_device(config.device)
    torch.manual_seed(config.seed)
    costs = Costs()

    t0 = time.perf_counter()
    with _distributed.rank_zero_first(dist_ctx):  # one download, not one per rank
        data = load_dataset(config.dataset, config.data_dir, download=config.download,
                            train_subset=config.train_subset, test_subset=config.test_subset)
    load_seconds = time.perf_counter() - t0
    costs.data_seconds += load_seconds

    model_kwargs = data.info.model_kwargs()
    model = build_model(config.model, **model_kwargs)
    if config.init_from:
        _init_from(model, config)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)

    # Under torchrun only rank 0 writes metrics, resume points and the summary.
    out_dir = Path(config.output) if config.output and (dist_ctx is None or dist_ctx.is_main) else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        previous = _resume["resume"]["epochs"] if _resume is not None else []
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in previous))

    epochs: list[dict[str, Any]] = []
    shuffle = torch.Generator().manual_seed(config.seed)
    first_epoch, counter_offset = 1, {}
    if _resume is not None:
        state = _resume["resume"]
        load_state(model, _resume["state_dict"], model_name=config.model)
        optimizer.load_state_dict(_resume["optimizer"])
        costs = Costs(**{**state["costs"], "data_seconds": state["costs"]["data_seconds"] + load_seconds})
        epochs = list(state["epochs"])
        shuffle.set_state(state["shuffle_state"])
        first_epoch = int(state["epoch"]) + 1
        counter_offset = dict(state["counters"])
        t_start -= float(state["wall_seconds"])  # wall-clock covers the whole run
    if dist_ctx is None:
        scorer, remote = _open_scorer(config, data, model_kwargs, device)
    else:  # rank 0 holds the one scoring session; every rank reaches it through DistributedScorer
        scorer, remote = _open_scorer_distributed(dist_ctx, config, data, model_kwargs, device)
    run = _Run(_distributed.per_rank_config(config, dist_ctx), data, model, optimizer, device, scorer, remote, costs,
               shuffle=shuffle, t_start=t_start, load_seconds=load_seconds, counter_offset=counter_offset)
    if dist_ctx is not None:
        run.dist, run.ddp = dist_ctx, dist_ctx.wrap(model)
    if scorer is not None and (remote if config.overlap is None else config.overlap):
        run.pipeline = ScorerPipeline()
    if _resume is not None:
        run.checkpoint_version = int(_resume.get("version", 0))
        run.selection_digest.update(str(_resume["resume"]["selection_sha256"]).encode())
        counter_offset["resumes"] = counter_offset.get("resumes", 0) + 1
    _mode_settings(run)
    _proxy_settings(run, model_kwargs)
    stopped_by: str | None = None
    try:
        for epoch in range(first_epoch, config.epochs + 1):
            partial = False
            try:
                kind = _run_epoch(run, mode, epoch)
            except _BudgetReached as stop:
                stopped_by, partial, kind = stop.reason, True, _epoch_kind(run, mode, epoch)
            acc, loss = _evaluate_point(run)
            line = {"epoch": epoch, "test_accuracy": acc, "test_loss": loss,
                    "wall_seconds": time.perf_counter() - t_start, "epoch_kind": kind, "partial": partial,
                    **_cost_fields(run), **_epoch_diagnostics(run)}
            epochs.append(line)
            if out_dir is not None:
                # The resume point first: it is the authority a resumed run rewrites metrics from.
                if not partial:
                    _save_resume_point(run, epoch, epochs, model_kwargs, out_dir)
                with open(out_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(line) + "\n")
            if log is not None:
                log(f"epoch {epoch}/{config.epochs}{' (partial)' if partial else ''}: "
                    f"test accuracy {acc:.4f}, test loss {loss:.4f}")
            if stopped_by is None and epoch < config.epochs:
                stopped_by = _budget_reason(run)  # spent exactly at the epoch's end: no empty epoch
            if stopped_by is not None:
                if log is not None:
                    log(f"stopped by {stopped_by.replace('_', '-')} after {costs.samples_trained} samples")
                break
        if run.pipeline is not None:
            run.pipeline.drain()  # background pushes and reports finish inside the run's wall-clock
        summary = _summary(run, mode, epochs, time.perf_counter() - t_start, stopped_by)
    finally:
        if run.pipeline is not None:
            run.pipeline.close(wait=True)
        if scorer is not None:
            scorer.close()
    if dist_ctx is not None:  # every rank's costs, totalled in rank 0's summary
        summary = dist_ctx.gather_summary(summary, run.costs, config.output, config.batch_size,
                                          run.selection_digest.hexdigest())
    if out_dir is not None:
        if epochs and epochs[-1].get("partial"):
            # A finished epoch was saved in the loop; a budget-stopped one still needs its final weights on disk.
            _save_resume_point(run, len(epochs), epochs, model_kwargs, out_dir)
        _write_json_atomic(out_dir / "summary.json", summary)
    return summary


def _save_resume_point(run: _Run, epoch: int, epochs: list[dict[str, Any]], model_kwargs: dict, out_dir: Path) -> None:
    """The run's checkpoint after a finished epoch: weights plus what `resume` needs (plain data)."""
    counters = _cost_fields(run)
    ckpt = make_checkpoint(run.config.model, model_kwargs, run.model, version=run.checkpoint_version,
                           step=run.costs.steps, optimizer=run.optimizer, config=asdict(run.config))
    ckpt["resume"] = {
        "epoch": epoch,
        "costs": asdict(run.costs),
        "epochs": epochs,
        "shuffle_state": run.shuffle.get_state(),
        "wall_seconds": time.perf_counter() - run.t_start,
        "counters": {k: counters[k] for k in ("checkpoint_bytes", "checkpoint_pushes", "reconnects", "resumes")},
        "selection_sha256": run.selection_digest.hexdigest(),
    }
    save_checkpoint(ckpt, out_dir / RESUME_FILE)


# -- setup ------------------------------------------------------------------------------
def _init_from(model: nn.Module, config: TrainConfig) -> None:
    ckpt = load_checkpoint(config.init_from)
    name = ckpt.get("model")
    if name is not None and name != config.model:
        raise InvalidArgument(
            f"--init-from {config.init_from} holds a {name!r} model but --model is {config.model!r}; pass --model {name}"
        )
    load_state(model, ckpt["state_dict"], model_name=config.model)


def _mode_settings(run: _Run) -> None:
    """Warm-up, refresh period and static-ness from the strategy's resolved options and class."""
    if run.scorer is None:
        return
    opts = run.scorer.info.resolved_options
    run.warmup_epochs = int(opts.get("warmup_epochs", 0) or 0)
    run.refresh = int(opts.get("refresh", 1) or 1)
    run.static = bool(getattr(get_selector(run.config.strategy), "static", False))


def _proxy_settings(run: _Run, model_kwargs: dict) -> None:
    """Build the slim sub-network to train jointly when the scorer scores with a parameter-sharing proxy."""
    info = run.scorer.info if run.scorer is not None else None
    if info is None or not info.proxy_width_ratio:
        return
    run.proxy = build_proxy(run.config.model, model_kwargs, info.proxy_width_ratio, full=run.model,
                            who=f"strategy {run.config.strategy!r} (parameter-sharing proxy)").to(run.device).train()
    run.proxy_weight = float(info.proxy_loss_weight)


def _epoch_diagnostics(run: _Run) -> dict[str, Any]:
    """{"diagnostics": mean of each numeric figure over this epoch's Selects}, or {} when there were none."""
    means = _mean_figures(run.diagnostics)
    run.diagnostics = []
    return {"diagnostics": means} if means else {}


def _mean_figures(items: list[dict[str, Any]]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for item in items:
        for key, value in item.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                sums.setdefault(key, []).append(float(value))
    return {key: sum(v) / len(v) for key, v in sums.items()}


def _open_scorer_distributed(ctx: Any, config: TrainConfig, data: Dataset, model_kwargs: dict,
                             device: torch.device) -> tuple[Scorer | None, bool]:
    """torchrun: rank 0 opens the scorer, every rank gets a DistributedScorer in front of it."""
    if config.select_fraction >= 1.0:
        return None, False
    scorer = _distributed.DistributedScorer(ctx, lambda: _open_scorer(config, data, model_kwargs, device)[0])
    return scorer, bool(config.server)


def _open_scorer(config: TrainConfig, data: Dataset, model_kwargs: dict, device: torch.device) -> tuple[Scorer | None, bool]:
    if config.select_fraction >= 1.0:
        return None, False  # the full-data baseline scores nothing
    spec = SessionSpec(
        strategy=config.strategy, options=dict(config.options), model_name=config.model,
        model_kwargs=model_kwargs, num_classes=data.info.num_classes, seed=config.seed,
        dataset=data.info.name, dataset_size=len(data.train), policy=config.policy,
        input_scale=config.score_input_scale,
    )
    if config.server and "," in config.server:  # several replicas: each pool is sharded over them
        from dataselect.client.replicas import open_replicated

        return open_replicated(config, spec, device), True
    if config.server:
        from dataselect.client.remote import RemoteScorer  # grpc only loads when a server is used

        return RemoteScorer(config.server, spec, token_file=config.token_file, tls_ca=config.tls_ca,
                            retry_seconds=config.retry_seconds, on_server_failure=config.on_server_failure,
                            fallback_device=device, checkpoint_dtype=config.checkpoint_dtype,
                            checkpoint_delta=config.checkpoint_delta), True
    return EmbeddedScorer(spec, device=device, micro_batch=config.micro_batch, precision=config.score_precision,
                          compile=config.score_compile), False


# -- training modes -----------------------------------------------------------------------
#
# Every mode is built from the same pieces: `_select` (one Select call with its cost
# accounting), `_train_on` (one SGD step + digest + report + budget check) and
# `_train_minibatches` (shuffled mini-batches over a list of positions). Warm-up epochs
# (strategy option `warmup_epochs`) run before any mode, on the full data: see `_run_epoch`.


class _BudgetReached(Exception):
    """Raised before a step once --budget-seconds or --budget-samples is spent."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _budget_reason(run: _Run) -> str | None:
    """Which budget is spent, if any. The clock excludes dataset loading and evaluation, so
    strategies are compared on what they spend training and selecting."""
    cfg = run.config
    if run.target_seconds is not None:
        return "target_accuracy"
    if run.dist is not None:  # all ranks agree: samples over every rank, the slowest rank's clock
        return run.dist.budget_reason(cfg.budget_samples, cfg.budget_seconds, run.costs.samples_trained,
                                      lambda: _budget_clock(run))
    if cfg.budget_samples is not None and run.costs.samples_trained >= cfg.budget_samples:
        return "budget_samples"
    if cfg.budget_seconds is not None and _budget_clock(run) >= cfg.budget_seconds:
        return "budget_seconds"
    return None


def _budget_clock(run: _Run) -> float:
    return time.perf_counter() - run.t_start - run.load_seconds - run.costs.eval_seconds


def _progress(run: _Run, epoch: int, within: float) -> Progress:
    """Progress with the 0-based epoch the strategies expect; `within` is the fraction of this epoch done."""
    cfg = run.config
    return Progress(epoch=epoch - 1, step=run.costs.steps, total_epochs=cfg.epochs,
                    fraction=((epoch - 1) + within) / cfg.epochs)


def _needs_inputs(run: _Run) -> bool:
    return run.scorer is not None and bool(run.scorer.info.signals)


@dataclass
class _PendingSelect:
    """A Select that was asked for; `_finish_select` waits for it and accounts its cost."""

    positions: torch.Tensor
    budget: int = 0
    #: The reply when the call ran inline, else the pipeline's future.
    reply: Any = None
    future: Any = None
    seconds: float = 0.0


def _request_select(run: _Run, positions: torch.Tensor, budget: int, progress: Progress, *,
                    fresh_model: bool) -> _PendingSelect:
    """Ask for one Select over the training samples at `positions`.

    `fresh_model`: push the current weights first unless the scorer already has them
    (whole-set selections score with the model as it is now; online pushes every
    `sync_every` steps instead and only needs a first push here). With a pipeline
    the call is queued behind any push and this returns at once.
    """
    split, costs, scorer = run.data.train, run.costs, run.scorer
    needs_inputs = _needs_inputs(run)
    if needs_inputs and (run.pushed_at_step is None or (fresh_model and run.pushed_at_step != costs.steps)):
        _push(run)
    t0 = time.perf_counter()
    ids = split.ids[positions]
    labels = split.labels[positions]
    inputs = split.inputs[positions] if needs_inputs else None
    costs.data_seconds += time.perf_counter() - t0
    if run.pipeline is not None:
        return _PendingSelect(positions, budget, future=run.pipeline.submit("select", scorer.select, ids, inputs,
                                                                           labels, budget, progress))
    t0 = time.perf_counter()
    reply = scorer.select(ids, inputs, labels, budget, progress)
    return _PendingSelect(positions, budget, reply=reply, seconds=time.perf_counter() - t0)


def _finish_select(run: _Run, pending: _PendingSelect) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Wait for a requested Select; returns (positions to train on, weights)."""
    cfg, split, costs = run.config, run.data.train, run.costs
    reply, waited = pending.reply, pending.seconds
    if pending.future is not None:
        t0 = time.perf_counter()
        reply = run.pipeline.wait("select", pending.future).value
        waited = time.perf_counter() - t0
    costs.score_seconds += waited  # the trainer's wait: all of it inline, the unhidden part overlapped
    costs.server_compute_seconds += reply.server_compute_seconds
    costs.transfer_seconds += reply.transfer_seconds
    costs.samples_scored += int(reply.samples_scored)
    if reply.diagnostics:
        run.diagnostics.append(reply.diagnostics)
        run.last_diagnostics = reply.diagnostics
    if reply.checkpoint_version in run.version_steps:
        # The selection trains at the next step; the model that chose it is this many steps older.
        stale = costs.steps - run.version_steps[reply.checkpoint_version]
        run.staleness_max = max(run.staleness_max, stale)
        run.staleness_sum += stale
        run.staleness_count += 1
    chosen = _positions_of(split, reply.selected_ids)
    run.budget_selected += pending.budget
    run.kept_selected += int(chosen.numel())
    # A variable-size selection may be empty (nothing in this pool worth training on): online mode
    # then takes the next pool; the accumulator never steps on an empty batch.
    weights = reply.weights
    if weights is not None and weights.numel() != chosen.numel():
        raise PluginError(f"strategy {cfg.strategy!r} returned {weights.numel()} weights for "
                          f"{chosen.numel()} selected samples")
    return chosen, weights


def _select(run: _Run, positions: torch.Tensor, budget: int, progress: Progress, *,
            fresh_model: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One Select, waited for: (positions to train on, weights). See `_request_select`."""
    return _finish_select(run, _request_select(run, positions, budget, progress, fresh_model=fresh_model))


def _train_on(run: _Run, positions: torch.Tensor, weights: torch.Tensor | None, progress: Progress):
    """One optimiser step on `positions` (repeats train once per occurrence), with its report."""
    reason = _budget_reason(run)
    if reason is not None:
        raise _BudgetReached(reason)
    if run.dist is not None:  # torchrun: this rank trains on its disjoint share of the global batch
        mine = run.dist.share(positions, weights, lambda p: run.data.train.ids[p], progress)
        if mine is None:  # fewer samples than ranks: no rank steps
            return torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool)
        positions, weights = mine
    stats = _train_step(run, positions, weights)
    ids = run.data.train.ids[positions]
    run.selection_digest.update(ids.numpy().tobytes())
    if run.config.eval_every is not None and run.costs.samples_trained >= run.next_eval:
        _evaluate_point(run)
    scorer = run.scorer
    if scorer is not None and scorer.info.uses_reports:
        # The training forward pass's own losses: strategies that learn from them cost no extra pass.
        t0 = time.perf_counter()
        if run.pipeline is not None:
            run.pipeline.submit("report", scorer.report, ids, *stats, progress)
        else:
            scorer.report(ids, *stats, progress)
        run.costs.report_seconds += time.perf_counter() - t0
    return stats


def _train_minibatches(run: _Run, epoch: int, positions: torch.Tensor, weights: torch.Tensor | None) -> None:
    """Shuffle `positions` (weights follow) and train on them in mini-batches of --batch-size."""
    bs = run.config.batch_size
    order = torch.randperm(len(positions), generator=run.shuffle)
    positions = positions[order]
    weights = None if weights is None else weights[order]
    n_steps = math.ceil(len(positions) / bs)
    with _bar(run, epoch, n_steps) as bar:
        for i in range(n_steps):
            part = slice(i * bs, (i + 1) * bs)
            stats = _train_on(run, positions[part], None if weights is None else weights[part],
                              _progress(run, epoch, i / n_steps))
            bar(stats)


def _full_epoch(run: _Run, epoch: int) -> None:
    """Every training sample once: the full-data baseline and strategy warm-up epochs."""
    _train_minibatches(run, epoch, torch.arange(len(run.data.train)), None)


class _Accumulator:
    """Selected positions (and weights) waiting for a full batch, in arrival order."""

    def __init__(self):
        self.positions: list[torch.Tensor] = []
        self.weights: list[torch.Tensor | None] = []
        self.size = 0

    def add(self, positions: torch.Tensor, weights: torch.Tensor | None) -> None:
        self.positions.append(positions)
        self.weights.append(weights)
        self.size += int(positions.numel())

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first `n` buffered samples (all of them if fewer)."""
        pos = torch.cat(self.positions)
        has_w = any(w is not None for w in self.weights)
        w = torch.cat([torch.ones(len(p)) if w is None else w.float()
                       for p, w in zip(self.positions, self.weights)]) if has_w else None
        rest_p, rest_w = pos[n:], (None if w is None else w[n:])
        self.positions, self.weights = ([rest_p], [rest_w]) if rest_p.numel() else ([], [])
        self.size = int(rest_p.numel())
        return pos[:n], (None if w is None else w[:n])


def _online_epoch(run: _Run, epoch: int) -> None:
    """Shuffle, walk pools of ceil(batch / fraction) candidates, train on what the scorer selects.

    Selections are accumulated until a full batch is ready (Jiang et al.'s selective
    backprop trains on full batches of kept samples), so strategies that keep a variable
    number (`exact_budget = False`) still step on --batch-size samples; the remainder is
    flushed at the end of the epoch. Exact-budget strategies fill one batch per pool, so
    for them this is the plain pool → batch step. An epoch is one pass of candidates over
    the training set.
    """
    cfg, split, costs = run.config, run.data.train, run.costs
    pool_size = math.ceil(cfg.batch_size / cfg.select_fraction)
    order = torch.randperm(len(split), generator=run.shuffle)
    n_pools = math.ceil(len(order) / pool_size)
    needs_inputs = _needs_inputs(run)
    buffer = _Accumulator()

    def step(n: int, within: float) -> None:
        positions, weights = buffer.take(n)
        stats = _train_on(run, positions, weights, _progress(run, epoch, within))
        if needs_inputs and costs.steps % cfg.sync_every == 0:
            _push(run)
        bar(stats)

    def request(i: int) -> _PendingSelect:
        positions = order[i * pool_size:(i + 1) * pool_size]
        budget = max(1, round(len(positions) * cfg.select_fraction))
        return _request_select(run, positions, budget, _progress(run, epoch, i / n_pools), fresh_model=False)

    # Overlapped: the pools that will fill the next batch are asked for before this pool's
    # samples are trained on, so the scorer works while the trainer trains (the selection
    # is at most --sync-every steps stale). Inline: each pool is asked for when it is needed.
    overlap = run.pipeline is not None
    pending: deque[_PendingSelect] = deque()
    asked = 0
    try:
        with _bar(run, epoch, n_pools) as bar:
            for i in range(n_pools):
                depth = 1 + _pools_per_batch(run) if overlap else 1
                while asked < n_pools and len(pending) < depth:
                    pending.append(request(asked))
                    asked += 1
                buffer.add(*_finish_select(run, pending.popleft()))
                while buffer.size >= cfg.batch_size:
                    step(cfg.batch_size, (i + 1) / n_pools)
            if buffer.size:
                step(buffer.size, 1.0)
    finally:
        for ahead in pending:  # a budget stop: the selections asked for ahead are not needed
            if ahead.future is not None:
                ahead.future.cancel()


#: Overlap never asks for more than this many pools ahead.
MAX_POOLS_AHEAD = 8


def _pools_per_batch(run: _Run) -> int:
    """Pools it takes to fill a batch, from the share of its budgets the strategy kept so far
    (a full pool's budget is one batch): exactly 1 for exact budgets (short last pools
    included), about 2 for Selective Backprop keeping half, so overlap asks for enough pools ahead."""
    if run.budget_selected == 0 or run.kept_selected == 0:
        return 1
    return max(1, min(MAX_POOLS_AHEAD, math.ceil(run.budget_selected / run.kept_selected - 1e-9)))


def _whole_set_budget(run: _Run) -> int:
    return max(1, round(len(run.data.train) * run.config.select_fraction))


def _select_whole_set(run: _Run, epoch: int) -> None:
    """Score the whole training set in one Select (budget = round(N × fraction)) and keep the result.

    One call, so the budget applies to the whole set; a remote scorer streams a pool this
    big in pieces (SelectStream) by itself, the embedded one scores it in micro-batches.
    """
    everything = torch.arange(len(run.data.train))
    run.selection = _select(run, everything, _whole_set_budget(run), _progress(run, epoch, 0.0), fresh_model=True)
    run.costs.refreshes += 1
    run.last_selection_size = int(run.selection[0].numel())


def _subset_epoch(run: _Run, epoch: int) -> None:
    """Train on a subset of the training set, re-selected every `refresh` epochs.

    The subset is selected from the whole training set at the first epoch after warm-up
    and then every `refresh` epochs (the strategy's resolved `refresh` option, else 1).
    Static strategies (class attribute `static = True`, e.g. MRMC) select once and keep
    that subset for the rest of training. Between refreshes each epoch is one shuffled
    pass of mini-batches over the subset, with the strategy's loss weights if it returned any.
    """
    since_warmup = epoch - 1 - run.warmup_epochs
    if run.selection is None or (not run.static and since_warmup % run.refresh == 0):
        _select_whole_set(run, epoch)
    _train_minibatches(run, epoch, *run.selection)


def _weighted_epoch(run: _Run, epoch: int) -> None:
    """Draw round(N × fraction) samples over the whole training set each epoch (with
    replacement for `with_replacement` strategies such as importance sampling) and train on
    every draw, repeats included, in shuffled mini-batches with the returned loss weights."""
    _select_whole_set(run, epoch)
    _train_minibatches(run, epoch, *run.selection)


#: Training modes by name (plugins.base.MODES).
EPOCH_RUNNERS: dict[str, Callable[[_Run, int], None]] = {
    "online": _online_epoch,
    "subset": _subset_epoch,
    "weighted": _weighted_epoch,
}


def _run_epoch(run: _Run, mode: str, epoch: int) -> str:
    """Run one epoch; returns what it was ("full" or the mode).

    Warm-up: a strategy with a `warmup_epochs` option (MRMC, importance sampling) gets
    that many full-data epochs first, in every mode, with reports of the training losses
    (MRMC fits its loss curves to them; importance sampling seeds its importances). They
    are part of --epochs and of every cost total: warm-up costs full-data time. Subset
    refreshes count from the first epoch after warm-up. Without a scorer
    (--select-fraction 1) every epoch is a full-data epoch.
    """
    kind = _epoch_kind(run, mode, epoch)
    if kind == "full":
        run.costs.full_data_epochs += 1
        _full_epoch(run, epoch)
    else:
        EPOCH_RUNNERS[mode](run, epoch)
    return kind


def _epoch_kind(run: _Run, mode: str, epoch: int) -> str:
    return "full" if run.scorer is None or epoch - 1 < run.warmup_epochs else mode


def _positions_of(split: Split, ids: torch.Tensor) -> torch.Tensor:
    """Positions in `split` of the given ids (ids are indices into the full split, and
    `--train-subset` keeps its head, so position == id). Repeats are kept: strategies
    that draw with replacement train on each occurrence."""
    ids = ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(split)):
        raise InvalidArgument("the scorer returned ids that are not in the training pool")
    return ids


def _train_step(run: _Run, positions: torch.Tensor, weights: torch.Tensor | None):
    """One SGD step; returns detached per-sample (loss, true-class prob, correct) on the CPU."""
    split, device, costs = run.data.train, run.device, run.costs
    t0 = time.perf_counter()
    non_blocking = device.type == "cuda"
    x = split.inputs[positions].to(device, non_blocking=non_blocking)
    y = split.labels[positions].to(device, non_blocking=non_blocking)
    costs.data_seconds += time.perf_counter() - t0
    synchronize(device)
    t0 = time.perf_counter()
    logits = run.model(x) if run.ddp is None else run.ddp(x)
    per_sample = F.cross_entropy(logits.float(), y, reduction="none")
    loss = weighted_loss(per_sample, weights)
    if run.proxy is not None:
        # DynaMS PSP: the sub-network that scores is trained jointly, through views of the
        # model's own parameters; its forward and backward are training cost.
        proxy_per_sample = F.cross_entropy(proxy_logits(run.model, run.proxy, x).float(), y, reduction="none")
        loss = loss + run.proxy_weight * weighted_loss(proxy_per_sample, weights)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    synchronize(device)
    costs.train_seconds += time.perf_counter() - t0
    costs.samples_trained += int(y.numel())
    costs.steps += 1
    with torch.no_grad():
        probs = logits.detach().float().softmax(1)
        true_p = probs.gather(1, y.unsqueeze(1)).squeeze(1)
        correct = probs.argmax(1) == y
    return per_sample.detach().cpu(), true_p.cpu(), correct.cpu()


def _push(run: _Run) -> None:
    """Send the current weights to the scorer: inline, or (overlapped) as a snapshot queued on the
    pipeline, so that the trainer pays only for the copy and Selects queued after it see it."""
    run.checkpoint_version += 1
    run.pushed_at_step = run.costs.steps
    run.version_steps[run.checkpoint_version] = run.costs.steps
    t0 = time.perf_counter()
    if run.pipeline is not None:
        snapshot = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        run.pipeline.submit("push", run.scorer.push_state, snapshot, run.checkpoint_version, run.costs.steps)
        run.costs.checkpoint_seconds += time.perf_counter() - t0
        return
    run.scorer.push_checkpoint(run.model, run.checkpoint_version, run.costs.steps)
    elapsed = time.perf_counter() - t0
    run.costs.checkpoint_seconds += elapsed
    if run.remote:
        run.costs.transfer_seconds += elapsed


# -- evaluation and reporting -----------------------------------------------------------
def _evaluate_point(run: _Run) -> tuple[float, float]:
    """Evaluate now (an --eval-every point, or an epoch's end); records the time to --target-accuracy.

    Times are on the budget clock: wall-clock less dataset loading and evaluation, so
    the evaluations a run makes do not count against it.
    """
    cfg, costs = run.config, run.costs
    last = run.eval_points[-1] if run.eval_points else None
    if last is not None and last["steps"] == costs.steps and last["samples_trained"] == costs.samples_trained:
        return last["test_accuracy"], last["test_loss"]  # nothing trained since: same model, same figures
    c0 = time.process_time()
    acc, loss = _evaluate(run)
    run.eval_cpu += time.process_time() - c0
    seconds, cpu = _budget_clock(run), _cpu_clock(run)
    run.eval_points.append({"samples_trained": costs.samples_trained, "steps": costs.steps,
                            "seconds": seconds, "cpu_seconds": cpu, "test_accuracy": acc, "test_loss": loss})
    if cfg.eval_every is not None:
        while run.next_eval <= costs.samples_trained:
            run.next_eval += cfg.eval_every
    if cfg.target_accuracy is not None and run.target_seconds is None and acc >= cfg.target_accuracy:
        run.target_seconds, run.target_samples, run.target_cpu_seconds = seconds, costs.samples_trained, cpu
    return acc, loss


def _cpu_clock(run: _Run) -> float:
    """CPU seconds this process spent training and selecting (all its threads, evaluation excluded):
    a figure that a busy machine inflates far less than wall-clock."""
    return time.process_time() - run.cpu_start - run.eval_cpu


def _evaluate(run: _Run) -> tuple[float, float]:
    """Test accuracy (0..1) and mean cross-entropy, in eval mode; under torchrun rank 0's, shared with all."""
    if run.dist is not None:
        return run.dist.evaluate(lambda: _evaluate_here(run), run.costs)
    return _evaluate_here(run)


@torch.no_grad()
def _evaluate_here(run: _Run) -> tuple[float, float]:
    t0 = time.perf_counter()
    model, split, device = run.model, run.data.test, run.device
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        for start in range(0, len(split), run.config.micro_batch):
            x = split.inputs[start:start + run.config.micro_batch].to(device)
            y = split.labels[start:start + run.config.micro_batch].to(device)
            logits = model(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    finally:
        model.train()
    synchronize(device)
    run.costs.eval_seconds += time.perf_counter() - t0
    n = max(1, len(split))
    return correct / n, loss_sum / n


def _cost_fields(run: _Run) -> dict[str, Any]:
    out: dict[str, Any] = asdict(run.costs)
    counters = run.scorer.counters if run.scorer is not None else None
    offset = run.counter_offset
    out["checkpoint_bytes"] = (counters.checkpoint_bytes if counters else 0) + offset.get("checkpoint_bytes", 0)
    out["checkpoint_pushes"] = (counters.checkpoint_pushes if counters else 0) + offset.get("checkpoint_pushes", 0)
    out["reconnects"] = (counters.reconnects if counters else 0) + offset.get("reconnects", 0)
    out["resumes"] = offset.get("resumes", 0)
    out["fallback"] = bool(counters.extra.get("fallback")) if counters else False
    if counters and "replicas" in counters.extra:  # --server a,b: replicas configured, live, down, revived
        out["replicas"] = {k: v for k, v in counters.extra.items() if k.startswith("replica")}
    return out


def _summary(run: _Run, mode: str, epochs: list[dict[str, Any]], wall: float,
             stopped_by: str | None) -> dict[str, Any]:
    cfg = run.config
    info = run.scorer.info if run.scorer is not None else None
    last = epochs[-1]
    return {
        "strategy": cfg.strategy,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "epochs": cfg.epochs,
        "mode": mode,
        "policy": info.policy if info else (cfg.policy or get_selector(cfg.strategy).default_policy),
        "options": dict(info.resolved_options) if info else get_selector(cfg.strategy).resolve_options(cfg.options),
        "select_fraction": cfg.select_fraction,
        "full_data": run.scorer is None,
        "scorer": "none" if run.scorer is None else ("remote" if run.remote else "embedded"),
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        "wall_seconds": wall,
        # Wall-clock less dataset loading and evaluation: what training and selecting took.
        "training_wall_seconds": _budget_clock(run),
        "training_cpu_seconds": _cpu_clock(run),
        **_cost_fields(run),
        # Per-mode fields: warm-up, subset refresh schedule, size of the last whole-set selection.
        "warmup_epochs": min(run.warmup_epochs, cfg.epochs) if run.scorer is not None else 0,
        "refresh_every": None if mode != "subset" or run.scorer is None else ("static" if run.static else run.refresh),
        "last_selection_size": run.last_selection_size,
        # DynaMS PSP: the jointly trained proxy; diagnostics = mean of the per-epoch means, and the last Select's.
        "proxy_width_ratio": info.proxy_width_ratio if info and info.proxy_width_ratio else None,
        "proxy_loss_weight": run.proxy_weight if run.proxy is not None else None,
        "diagnostics": _mean_figures([e["diagnostics"] for e in epochs if e.get("diagnostics")]),
        "diagnostics_last": dict(run.last_diagnostics),
        "epochs_completed": len(epochs) - (1 if last.get("partial") else 0),
        "stopped_by": stopped_by,
        "budget_seconds": cfg.budget_seconds,
        "budget_samples": cfg.budget_samples,
        "train_samples": len(run.data.train),
        "test_samples": len(run.data.test),
        "selection_sha256": run.selection_digest.hexdigest(),
        **_overlap_fields(run),
        "target_accuracy": cfg.target_accuracy,
        # Training seconds (wall-clock less data loading and evaluation) and samples to reach it.
        "time_to_target_seconds": run.target_seconds,
        "samples_to_target": run.target_samples,
        "time_to_target_cpu_seconds": run.target_cpu_seconds,
        "eval_points": run.eval_points,
        "device": str(run.device),
        "scorer_device": info.device if info else None,
        "torch_version": torch.__version__,
        "config": asdict(cfg),
        "per_epoch": epochs,
    }


def _overlap_fields(run: _Run) -> dict[str, Any]:
    """How stale the scoring model was and how much scoring the overlap hid.

    `staleness_*_steps`: optimiser steps between the checkpoint a selection was scored
    with and the step that trains on it (0 without overlap at --sync-every 1; at most
    --sync-every with overlap). `hidden_score_fraction`: share of the time the scorer
    spent on Selects that the trainer did not wait for (0 without overlap).
    `background_*_seconds`: worker time of overlapped calls, off the critical path.
    """
    pipe = run.pipeline
    return {
        "overlap": pipe is not None,
        "sync_every": run.config.sync_every,
        "staleness_max_steps": run.staleness_max,
        "staleness_mean_steps": run.staleness_sum / run.staleness_count if run.staleness_count else 0.0,
        "hidden_score_fraction": pipe.hidden_fraction("select") if pipe is not None else 0.0,
        "background_score_seconds": pipe.busy_seconds.get("select", 0.0) if pipe is not None else 0.0,
        "background_checkpoint_seconds": pipe.busy_seconds.get("push", 0.0) if pipe is not None else 0.0,
        "background_report_seconds": pipe.busy_seconds.get("report", 0.0) if pipe is not None else 0.0,
        "checkpoint_dtype": run.config.checkpoint_dtype if run.remote else "float32",
        "checkpoint_delta": bool(run.config.checkpoint_delta and run.remote),
    }


@contextmanager
def _bar(run: _Run, epoch: int, total: int):
    """Yields `update(stats)` for one epoch's progress bar (a no-op off a terminal)."""
    cfg = run.config
    if not cfg.progress or not sys.stderr.isatty():
        yield lambda stats: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"epoch {epoch}/{cfg.epochs}", unit="step", leave=False, dynamic_ncols=True)

    def update(stats) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{float(stats[0].mean()):.3f}", refresh=False)

    try:
        yield update
    finally:
        bar.close()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


COST_ROWS = (
    ("training (fwd+bwd+opt)", "train_seconds"),
    ("scoring wait", "score_seconds"),
    ("  of which server compute", "server_compute_seconds"),
    ("training-side reports", "report_seconds"),
    ("checkpoint pushes", "checkpoint_seconds"),
    # Wire + codec time of Selects and checkpoint pushes: part of the two rows above.
    ("transfer (within the above)", "transfer_seconds"),
    ("evaluation", "eval_seconds"),
    ("data", "data_seconds"),
)


def format_cost_table(summary: dict[str, Any]) -> str:
    """A short human table of where the wall time went."""
    # Under torchrun the seconds are summed over ranks: compare them with wall x ranks.
    wall = (summary["wall_seconds"] or 1e-9) * summary.get("world_size", 1)
    lines = [
        f"{summary['strategy']} on {summary['dataset']} ({summary['model']}, {summary['epochs']} epoch(s), "
        f"{summary['scorer']} scorer): test accuracy {summary['test_accuracy']:.4f}",
        f"{'cost':<27}{'seconds':>10}{'% wall':>9}",
    ]
    for label, key in COST_ROWS:
        lines.append(f"{label:<27}{summary[key]:>10.2f}{100 * summary[key] / wall:>8.1f}%")
    lines.append(f"{'wall':<27}{summary['wall_seconds']:>10.2f}")
    if summary.get("proxy_width_ratio"):
        rho = summary.get("diagnostics", {}).get("proxy_rank_correlation")
        lines.append(f"proxy: width ratio {summary['proxy_width_ratio']:g} trained jointly (its cost is in training)"
                     + ("" if rho is None else f", rank correlation of its margins with the full model's {rho:.3f}"))
    lines.append(
        f"samples trained {summary['samples_trained']}, scored {summary['samples_scored']}, "
        f"checkpoint pushes {summary['checkpoint_pushes']} ({summary['checkpoint_bytes']} bytes)"
    )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m dataselect.client.train / torchrun -m dataselect.client.train
    from dataselect.client.cli import main

    main()
