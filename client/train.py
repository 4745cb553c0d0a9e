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

Modes: only `online` is implemented (Selective-Backprop style: every step a
pool of `ceil(batch / select_fraction)` candidates, train on the `budget`
selected). `subset` and `weighted` plug into `EPOCH_RUNNERS`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dataselect.checkpoint import load_checkpoint, load_state, make_checkpoint, save_checkpoint
from dataselect.client.data import Dataset, Split, load_dataset
from dataselect.client.scorer import EmbeddedScorer, Scorer, SessionSpec
from dataselect.engine import resolve_device, synchronize
from dataselect.errors import InvalidArgument, PluginError
from dataselect.models import build_model
from dataselect.plugins import get_model_builder, get_selector
from dataselect.plugins.base import MODES, Progress
from dataselect.plugins.policies import POLICIES


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
    #: Push the checkpoint to the scorer every N optimiser steps.
    sync_every: int = 1
    #: Micro-batch for scoring (embedded) and evaluation.
    micro_batch: int = 1024
    init_from: str | None = None
    #: Per-epoch progress bar (still only drawn on a terminal).
    progress: bool = True


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
    samples_trained: int = 0
    samples_scored: int = 0
    steps: int = 0


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
    checkpoint_version: int = 0


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
    get_model_builder(config.model)
    if config.policy and config.policy not in POLICIES:
        raise InvalidArgument(f"unknown policy {config.policy!r}; use one of: {', '.join(POLICIES)}")
    mode = config.mode or cls.default_mode
    if mode not in MODES:
        raise InvalidArgument(f"unknown mode {mode!r}; use one of: {', '.join(MODES)}")
    if mode not in EPOCH_RUNNERS:
        raise InvalidArgument(
            f"mode {mode!r} is not implemented yet (strategy {config.strategy!r} defaults to {cls.default_mode!r}); "
            f"use --mode {' or --mode '.join(EPOCH_RUNNERS)}"
        )
    if not 0.0 < config.select_fraction <= 1.0:
        raise InvalidArgument(f"--select-fraction must be in (0, 1], got {config.select_fraction}")
    for name in ("epochs", "batch_size", "sync_every", "micro_batch"):
        if getattr(config, name) < 1:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.lr <= 0:
        raise InvalidArgument(f"--lr must be > 0, got {config.lr}")
    if config.threads is not None and config.threads < 1:
        raise InvalidArgument(f"--threads must be >= 1, got {config.threads}")
    return mode


def train(config: TrainConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train, evaluate each epoch, and return the summary (also written under `config.output`)."""
    t_start = time.perf_counter()
    mode = validate_config(config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    costs = Costs()

    t0 = time.perf_counter()
    data = load_dataset(config.dataset, config.data_dir, download=config.download,
                        train_subset=config.train_subset, test_subset=config.test_subset)
    costs.data_seconds += time.perf_counter() - t0

    model_kwargs = data.info.model_kwargs()
    model = build_model(config.model, **model_kwargs)
    if config.init_from:
        _init_from(model, config)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)

    out_dir = Path(config.output) if config.output else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").write_text("")

    scorer, remote = _open_scorer(config, data, model_kwargs, device)
    run = _Run(config, data, model, optimizer, device, scorer, remote, costs,
               shuffle=torch.Generator().manual_seed(config.seed))
    epochs: list[dict[str, Any]] = []
    try:
        for epoch in range(1, config.epochs + 1):
            EPOCH_RUNNERS[mode](run, epoch)
            acc, loss = _evaluate(run)
            line = {"epoch": epoch, "test_accuracy": acc, "test_loss": loss,
                    "wall_seconds": time.perf_counter() - t_start, **_cost_fields(run)}
            epochs.append(line)
            if out_dir is not None:
                with open(out_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(line) + "\n")
            if log is not None:
                log(f"epoch {epoch}/{config.epochs}: test accuracy {acc:.4f}, test loss {loss:.4f}")
        summary = _summary(run, mode, epochs, time.perf_counter() - t_start)
    finally:
        if scorer is not None:
            scorer.close()
    if out_dir is not None:
        ckpt = make_checkpoint(config.model, model_kwargs, model, version=run.checkpoint_version,
                               step=costs.steps, optimizer=optimizer, config=asdict(config))
        save_checkpoint(ckpt, out_dir / "checkpoint.pt")
        _write_json_atomic(out_dir / "summary.json", summary)
    return summary


# -- setup ------------------------------------------------------------------------------
def _init_from(model: nn.Module, config: TrainConfig) -> None:
    ckpt = load_checkpoint(config.init_from)
    name = ckpt.get("model")
    if name is not None and name != config.model:
        raise InvalidArgument(
            f"--init-from {config.init_from} holds a {name!r} model but --model is {config.model!r}; pass --model {name}"
        )
    load_state(model, ckpt["state_dict"], model_name=config.model)


def _open_scorer(config: TrainConfig, data: Dataset, model_kwargs: dict, device: torch.device) -> tuple[Scorer | None, bool]:
    if config.select_fraction >= 1.0:
        return None, False  # the full-data baseline scores nothing
    spec = SessionSpec(
        strategy=config.strategy, options=dict(config.options), model_name=config.model,
        model_kwargs=model_kwargs, num_classes=data.info.num_classes, seed=config.seed,
        dataset=data.info.name, dataset_size=len(data.train), policy=config.policy,
    )
    if config.server:
        from dataselect.client.remote import RemoteScorer  # grpc only loads when a server is used

        return RemoteScorer(config.server, spec), True
    return EmbeddedScorer(spec, device=device, micro_batch=config.micro_batch), False


# -- the online mode ----------------------------------------------------------------------
def _online_epoch(run: _Run, epoch: int) -> None:
    """Shuffle, walk pools of ceil(batch / fraction) candidates, train on what the scorer selects."""
    cfg, train_split, costs = run.config, run.data.train, run.costs
    fraction = cfg.select_fraction
    pool_size = math.ceil(cfg.batch_size / fraction)
    order = torch.randperm(len(train_split), generator=run.shuffle)
    n_pools = math.ceil(len(order) / pool_size)
    scorer = run.scorer
    needs_inputs = scorer is not None and bool(scorer.info.signals)
    if needs_inputs and costs.steps == 0:
        _push(run)  # the scorer's copy must match before the first Select
    bar = _progress_bar(cfg, n_pools, f"epoch {epoch}/{cfg.epochs}")
    try:
        for i in range(n_pools):
            positions = order[i * pool_size:(i + 1) * pool_size]
            progress = Progress(epoch=epoch - 1, step=costs.steps, total_epochs=cfg.epochs,
                                fraction=((epoch - 1) + i / n_pools) / cfg.epochs)
            weights = None
            if scorer is None:
                chosen = positions
            else:
                t0 = time.perf_counter()
                ids = train_split.ids[positions]
                labels = train_split.labels[positions]
                inputs = train_split.inputs[positions] if needs_inputs else None
                costs.data_seconds += time.perf_counter() - t0
                budget = max(1, round(len(positions) * fraction))
                t0 = time.perf_counter()
                reply = scorer.select(ids, inputs, labels, budget, progress)
                costs.score_seconds += time.perf_counter() - t0
                costs.server_compute_seconds += reply.server_compute_seconds
                costs.transfer_seconds += reply.transfer_seconds
                costs.samples_scored += int(reply.samples_scored)
                chosen = _positions_of(train_split, reply.selected_ids)
                weights = reply.weights
                if chosen.numel() == 0:  # the contract says >= 1; an empty step would train on NaN
                    raise PluginError(f"strategy {cfg.strategy!r} selected no samples from a pool of {len(positions)}")
            stats = _train_step(run, chosen, weights)
            run.selection_digest.update(train_split.ids[chosen].numpy().tobytes())
            if scorer is not None and scorer.info.uses_reports:
                scorer.report(train_split.ids[chosen], *stats, progress)
            if needs_inputs and costs.steps % cfg.sync_every == 0:
                _push(run)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(stats[0].mean()):.3f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()


#: Training modes that are implemented; `subset` and `weighted` go here when they land.
EPOCH_RUNNERS: dict[str, Callable[[_Run, int], None]] = {"online": _online_epoch}


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
    logits = run.model(x)
    per_sample = F.cross_entropy(logits.float(), y, reduction="none")
    loss = weighted_loss(per_sample, weights)
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
    run.checkpoint_version += 1
    t0 = time.perf_counter()
    run.scorer.push_checkpoint(run.model, run.checkpoint_version, run.costs.steps)
    elapsed = time.perf_counter() - t0
    run.costs.checkpoint_seconds += elapsed
    if run.remote:
        run.costs.transfer_seconds += elapsed


# -- evaluation and reporting -----------------------------------------------------------
@torch.no_grad()
def _evaluate(run: _Run) -> tuple[float, float]:
    """Test accuracy (0..1) and mean cross-entropy, in eval mode."""
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
    out["checkpoint_bytes"] = counters.checkpoint_bytes if counters else 0
    out["checkpoint_pushes"] = counters.checkpoint_pushes if counters else 0
    out["reconnects"] = counters.reconnects if counters else 0
    return out


def _summary(run: _Run, mode: str, epochs: list[dict[str, Any]], wall: float) -> dict[str, Any]:
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
        **_cost_fields(run),
        "train_samples": len(run.data.train),
        "test_samples": len(run.data.test),
        "selection_sha256": run.selection_digest.hexdigest(),
        "device": str(run.device),
        "scorer_device": info.device if info else None,
        "torch_version": torch.__version__,
        "config": asdict(cfg),
        "per_epoch": epochs,
    }


def _progress_bar(config: TrainConfig, total: int, desc: str):
    if not config.progress or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


COST_ROWS = (
    ("training (fwd+bwd+opt)", "train_seconds"),
    ("scoring wait", "score_seconds"),
    ("  of which server compute", "server_compute_seconds"),
    ("  of which transfer", "transfer_seconds"),
    ("checkpoint pushes", "checkpoint_seconds"),
    ("evaluation", "eval_seconds"),
    ("data", "data_seconds"),
)


def format_cost_table(summary: dict[str, Any]) -> str:
    """A short human table of where the wall time went."""
    wall = summary["wall_seconds"] or 1e-9
    lines = [
        f"{summary['strategy']} on {summary['dataset']} ({summary['model']}, {summary['epochs']} epoch(s), "
        f"{summary['scorer']} scorer): test accuracy {summary['test_accuracy']:.4f}",
        f"{'cost':<27}{'seconds':>10}{'% wall':>9}",
    ]
    for label, key in COST_ROWS:
        lines.append(f"{label:<27}{summary[key]:>10.2f}{100 * summary[key] / wall:>8.1f}%")
    lines.append(f"{'wall':<27}{summary['wall_seconds']:>10.2f}")
    lines.append(
        f"samples trained {summary['samples_trained']}, scored {summary['samples_scored']}, "
        f"checkpoint pushes {summary['checkpoint_pushes']} ({summary['checkpoint_bytes']} bytes)"
    )
    return "\n".join(lines)
