"""`dataselect-train`: a short script that composes the library.

`train(TrainConfig(...))` trains a registry model on a dataset, choosing its
training samples through a `dataselect.Session` (embedded in-process, or
remote with `server=HOST:PORT`), and returns a summary dict with the cost
split (`dataselect.client.costs.Costs`): training compute apart from the
scoring wait, server compute, transfer, checkpoint pushes, reports,
evaluation and data. The session's loader runs the strategy's mode (online,
subset, weighted) and its warm-up; this script adds what a training run
needs around it (`dataselect.client.training`): the optimiser and schedule,
timed steps, evaluation, budgets, resume points and the summary.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable

import click
import torch

from dataselect.checkpoint import load_checkpoint, load_state
from dataselect.client import distributed as _distributed
from dataselect.client.config import TrainConfig, check_ranges, config_from_options
from dataselect.client.costs import Costs, format_cost_table, selection_payoff
from dataselect.client.replicas import parse_servers
from dataselect.client.session import EngineOptions, RemoteOptions, Session, weighted_loss
from dataselect.client.training import (
    RESUME_FILE,
    Evaluator,
    Progress,
    RunClock,
    make_scheduler,
    mean_figures,
    read_resume_point,
    save_resume_point,
    write_json_atomic,
)
from dataselect.datasets import check_dataset_spec, open_dataset
from dataselect.engine import resolve_device, synchronize
from dataselect.errors import InvalidArgument
from dataselect.models import build_model
from dataselect.names import MODES
from dataselect.policies import POLICIES
from dataselect.registry import get_model_builder, get_strategy

__all__ = ["TrainConfig", "train", "resume", "validate_config", "format_cost_table", "weighted_loss", "Costs"]


def validate_config(config: TrainConfig) -> str:
    """Check everything that needs no data or model; returns the training mode.

    Runs before any data is loaded so a typo fails in milliseconds.
    """
    cls = get_strategy(config.strategy)
    cls.resolve_options(config.options)
    check_dataset_spec(config.dataset)
    check_ranges(config)
    if config.server:
        parse_servers(config.server)  # a bad entry fails before any data is loaded
    get_model_builder(config.model)
    if config.policy and config.policy not in POLICIES:
        raise InvalidArgument(f"unknown policy {config.policy!r}; use one of: {', '.join(POLICIES)}")
    mode = config.mode or cls.default_mode
    if mode not in MODES:
        raise InvalidArgument(f"unknown mode {mode!r}; use one of: {', '.join(MODES)}")
    return mode


def resume(output: str | Path, *, server: str | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Continue a run from the checkpoint it wrote at its last finished epoch in `output`.

    The model, optimiser, schedule, shuffling generators, the current subset
    (MRMC's core-set included), costs and per-epoch metrics are restored, so
    the resumed run's figures cover the whole run. The strategy's per-sample
    state (e.g. loss histories) is not part of the trainer's checkpoint and
    starts afresh, as after a server restart. `server` replaces the saved
    server address (the server may have moved).
    """
    ckpt = read_resume_point(output)
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    config.output = str(output)
    if server is not None:
        config.server = server
    if ckpt["resume"]["epoch"] >= config.epochs:
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

    t0 = time.perf_counter()
    with _distributed.rank_zero_first(dist_ctx):  # one download, not one per rank
        data = open_dataset(config.dataset, config.data_dir, download=config.download,
                            train_subset=config.train_subset, test_subset=config.test_subset, seed=config.seed,
                            augment=config.augment, label_noise=config.label_noise, imbalance=config.imbalance)
    load_seconds = time.perf_counter() - t0

    model_kwargs = data.info.model_kwargs()
    model = build_model(config.model, **model_kwargs)
    if config.init_from:
        _init_from(model, config)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    session = Session(
        config.strategy, model, fraction=config.select_fraction, options=config.options, policy=config.policy,
        mode=mode, epochs=config.epochs, server=config.server, sync_every=config.sync_every, overlap=config.overlap,
        ramp_steps=config.ramp_steps,
        seed=config.seed, device=device, input_scale=config.score_input_scale, dataset=data.info.name,
        engine=EngineOptions(micro_batch=config.micro_batch, precision=config.score_precision,
                             compile=config.score_compile),
        remote=RemoteOptions(token_file=config.token_file, tls_ca=config.tls_ca,
                             on_server_failure=config.on_server_failure, retry_seconds=config.retry_seconds,
                             checkpoint_dtype=config.checkpoint_dtype, checkpoint_delta=config.checkpoint_delta),
        # Warnings reach the user even with -q (no log): they say what the run will not do.
        warn=(lambda message: log(f"warning: {message}")) if log is not None else _stderr_warning)
    session.dist = dist_ctx
    costs = session.costs
    costs.data_seconds += load_seconds
    workers = _workers(config)
    if data.train_tensors is not None:  # in memory: indexed directly, batches augmented at once
        loader = session.loader(data.train_tensors, batch_size=config.batch_size, augment=data.augment_batch,
                                estimate_train_time=False)
    else:  # decoded on demand by DataLoader workers
        loader = session.loader(data.train, batch_size=config.batch_size, plain=data.train_plain,
                                labels=data.train_labels, num_workers=workers, pin_memory=device.type == "cuda",
                                estimate_train_time=False)
    noisy = None if data.clean_labels is None else (data.train_labels != data.clean_labels)
    noisy_trained = 0
    ddp = dist_ctx.wrap(model) if dist_ctx is not None else None

    # Under torchrun only rank 0 writes metrics, resume points and the summary.
    out_dir = Path(config.output) if config.output and (dist_ctx is None or dist_ctx.is_main) else None
    epochs: list[dict[str, Any]] = []
    first_epoch = 1
    if _resume is not None:
        state = _resume["resume"]
        load_state(model, _resume["state_dict"], model_name=config.model)
        optimizer.load_state_dict(_resume["optimizer"])
        session.load_state_dict(state["session"])
        costs = session.costs
        costs.data_seconds += load_seconds
        loader.load_state_dict(state["loader"])
        epochs = list(state["epochs"])
        first_epoch = int(state["epoch"]) + 1
        t_start -= float(state["wall_seconds"])  # wall-clock covers the whole run
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in epochs))
    scheduler = make_scheduler(optimizer, config.lr_schedule, _estimated_steps(config, len(data.train_labels), session))
    if scheduler is not None and _resume is not None and "scheduler" in _resume["resume"]:
        scheduler.load_state_dict(_resume["resume"]["scheduler"])
    clock = RunClock(costs=costs, t_start=t_start, load_seconds=load_seconds, budget_seconds=config.budget_seconds,
                     budget_samples=config.budget_samples, target_accuracy=config.target_accuracy,
                     eval_every=config.eval_every, dist=dist_ctx)
    evaluator = Evaluator(model, data.test_tensors if data.test_tensors is not None else data.test, device=device,
                          micro_batch=config.micro_batch, costs=costs, dist=dist_ctx, num_workers=workers)
    non_blocking = device.type == "cuda"

    def train_step(batch) -> torch.Tensor:
        """One optimiser step on the batch, timed on the synchronised device."""
        t0 = time.perf_counter()
        x = batch.inputs.to(device, non_blocking=non_blocking)
        y = batch.targets.to(device, non_blocking=non_blocking)
        costs.data_seconds += time.perf_counter() - t0
        synchronize(device)
        t0 = time.perf_counter()
        logits = model(x) if ddp is None else ddp(x)
        loss = session.loss(logits, y, inputs=x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        synchronize(device)
        costs.train_seconds += time.perf_counter() - t0
        return loss.detach()

    stopped_by: str | None = None
    try:
        for epoch in range(first_epoch, config.epochs + 1):
            partial = False
            batches = iter(loader)
            bar = Progress(epoch, config.epochs, len(loader), enabled=config.progress and log is not None, log=log)
            try:
                for batch in batches:
                    stopped_by = clock.stop_reason()
                    if stopped_by is not None:
                        partial = True
                        break
                    loss = train_step(batch)
                    if noisy is not None:
                        noisy_trained += int(noisy[batch.ids].sum())
                    if clock.eval_due():
                        clock.evaluate(evaluator)
                    bar.update(loss)
            finally:
                batches.close()
                bar.close()
            acc, loss = clock.evaluate(evaluator)
            line = {"epoch": epoch, "test_accuracy": acc, "test_loss": loss,
                    "wall_seconds": time.perf_counter() - t_start, "epoch_kind": loader.epoch_kind,
                    "partial": partial, **_cost_fields(session), **_epoch_diagnostics(session)}
            epochs.append(line)
            if out_dir is not None:
                # The resume point first: it is the authority a resumed run rewrites metrics from.
                if not partial:
                    _save(out_dir, config, model_kwargs, model, optimizer, scheduler, session, loader, epoch, epochs,
                          t_start)
                with open(out_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(line) + "\n")
            if log is not None:
                log(f"epoch {epoch}/{config.epochs}{' (partial)' if partial else ''}: "
                    f"test accuracy {acc:.4f}, test loss {loss:.4f}")
            if stopped_by is None and epoch < config.epochs:
                stopped_by = clock.stop_reason()  # spent exactly at the epoch's end: no empty epoch
            if stopped_by is not None:
                if log is not None:
                    log(f"stopped by {stopped_by.replace('_', '-')} after {costs.samples_trained} samples")
                break
        session.drain()  # background pushes and reports finish inside the run's wall-clock
        summary = _summary(config, mode, session, loader, clock, data, epochs, time.perf_counter() - t_start,
                           stopped_by, device)
        summary["noisy_samples_trained"] = noisy_trained if noisy is not None else None
        summary.update(selection_payoff(summary))
    finally:
        session.close()
    if dist_ctx is not None:  # every rank's costs, totalled in rank 0's summary
        summary = dist_ctx.gather_summary(summary, costs, config.output, config.batch_size,
                                          session.digest.hexdigest())
    if out_dir is not None:
        if epochs and epochs[-1].get("partial"):
            # A finished epoch was saved in the loop; a budget-stopped one still needs its final weights on disk.
            _save(out_dir, config, model_kwargs, model, optimizer, scheduler, session, loader, len(epochs), epochs,
                  t_start)
        write_json_atomic(out_dir / "summary.json", summary)
    return summary


def run_from_command_line(kw: dict[str, Any]) -> None:
    """`dataselect-train`'s body, given its parsed options (`dataselect.client.cli`)."""
    quiet = kw["quiet"] or _distributed.rank() != 0  # under torchrun rank 0 speaks for the run
    as_json = kw["as_json"] and _distributed.rank() == 0
    log = None if quiet else (lambda msg: click.echo(msg, err=True))
    if kw["resume"]:
        summary = resume(kw["resume"], server=kw["server"], log=log)
    else:
        summary = train(config_from_options(kw, progress=not kw["quiet"]), log=log)
    if not quiet:
        click.echo(format_cost_table(summary), err=True)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:  # the result line, even with -q
        click.echo(f"test_accuracy {summary['test_accuracy']:.4f}")


def _workers(config: TrainConfig) -> int:
    if config.num_workers is not None:
        return config.num_workers
    return min(4, max(0, (os.cpu_count() or 1) // 2))


def _estimated_steps(config: TrainConfig, n: int, session: Session) -> int:
    """Optimiser steps the run will take (a learning-rate schedule spans them): full-data warm-up
    epochs, then the selected share of the data each epoch."""
    world = session.dist.world if session.dist is not None else 1
    batch = config.batch_size * world
    warm = min(config.epochs, math.ceil(session.warmup_epochs)) if session.scoring else config.epochs
    share = 1.0 if not session.scoring or session.cls.self_sized else config.select_fraction
    return warm * math.ceil(n / batch) + (config.epochs - warm) * math.ceil(n * share / batch)


def _save(out_dir: Path, config: TrainConfig, model_kwargs: dict, model, optimizer, scheduler, session: Session,
          loader, epoch: int, epochs: list[dict[str, Any]], t_start: float) -> None:
    save_resume_point(out_dir / RESUME_FILE, model_name=config.model, model_kwargs=model_kwargs, model=model,
                      optimizer=optimizer, scheduler=scheduler, config=asdict(config),
                      version=session.checkpoint_version, step=session.steps,
                      state={"epoch": epoch, "epochs": epochs, "wall_seconds": time.perf_counter() - t_start,
                             "session": session.state_dict(), "loader": loader.state_dict()})


def _init_from(model, config: TrainConfig) -> None:
    ckpt = load_checkpoint(config.init_from)
    name = ckpt.get("model")
    if name is not None and name != config.model:
        raise InvalidArgument(
            f"--init-from {config.init_from} holds a {name!r} model but --model is {config.model!r}; pass --model {name}"
        )
    load_state(model, ckpt["state_dict"], model_name=config.model)


def _cost_fields(session: Session) -> dict[str, Any]:
    return {**asdict(session.costs), **session.counters()}


def _epoch_diagnostics(session: Session) -> dict[str, Any]:
    """{"diagnostics": mean of each numeric figure over this epoch's Selects}, or {} when there were none."""
    means = mean_figures(session.take_diagnostics())
    return {"diagnostics": means} if means else {}


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _summary(config: TrainConfig, mode: str, session: Session, loader, clock: RunClock, data, epochs: list,
             wall: float, stopped_by: str | None, device: torch.device) -> dict[str, Any]:
    info = session.info
    last = epochs[-1]
    cls = get_strategy(config.strategy)
    return {
        "strategy": config.strategy,
        "dataset": config.dataset,
        "model": config.model,
        "epochs": config.epochs,
        "mode": mode,
        "policy": info.policy if info else (config.policy or cls.default_policy),
        "options": dict(info.resolved_options) if info else cls.resolve_options(config.options),
        "select_fraction": config.select_fraction,
        "full_data": not session.scoring,
        "scorer": "none" if session.scorer is None else ("remote" if session.remote else "embedded"),
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        "wall_seconds": wall,
        # Wall-clock less dataset loading and evaluation: what training and selecting took.
        "training_wall_seconds": clock.seconds(),
        "training_cpu_seconds": clock.cpu_seconds(),
        **_cost_fields(session),
        # Per-mode fields: warm-up, subset refresh schedule, size of the last whole-set selection.
        "warmup_epochs": _number(min(session.warmup_epochs, config.epochs)) if session.scoring else 0,
        "refresh_every": None if mode != "subset" or not session.scoring else (
            "static" if session.static else session.refresh),
        "last_selection_size": loader.last_selection_size,
        "lr_schedule": config.lr_schedule,
        # The loss term the strategy added (e.g. DynaMS's proxy); diagnostics = mean of the per-epoch means,
        # and the last Select's.
        "auxiliary_loss": session.auxiliary.to_dict() if session.auxiliary is not None else None,
        "diagnostics": mean_figures([e["diagnostics"] for e in epochs if e.get("diagnostics")]),
        "diagnostics_last": dict(session.last_diagnostics),
        "epochs_completed": len(epochs) - (1 if last.get("partial") else 0),
        "stopped_by": stopped_by,
        "budget_seconds": config.budget_seconds,
        "budget_samples": config.budget_samples,
        "train_samples": len(data.train_labels),
        "test_samples": len(data.test),
        "augmentation": data.info.augmentation if config.augment else "none",
        "variant": dict(data.variant),
        "selection_sha256": session.digest.hexdigest(),
        **session.overlap_figures(),
        **session.irreducible_figures,
        "target_accuracy": config.target_accuracy,
        # Training seconds (wall-clock less data loading and evaluation) and samples to reach it.
        "time_to_target_seconds": clock.target_seconds,
        "samples_to_target": clock.target_samples,
        "time_to_target_cpu_seconds": clock.target_cpu_seconds,
        "eval_points": clock.eval_points,
        "device": str(device),
        "scorer_device": info.device if info else None,
        "torch_version": torch.__version__,
        "config": asdict(replace(config, batch_size=loader.global_batch)) if session.dist is not None else asdict(config),
        "per_epoch": epochs,
    }


if __name__ == "__main__":  # python -m dataselect.client.train / torchrun -m dataselect.client.train
    from dataselect.client.cli import main

    main()


def _stderr_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
