"""Pieces a training script composes around `dataselect.Session`, one job each.

* `Evaluator`: test accuracy and loss in eval mode, timed apart from training.
* `RunClock`: the budget clock (wall-clock less data loading and evaluation),
  `--budget-seconds` / `--budget-samples` / `--target-accuracy` stops, and
  evaluation points (`--eval-every`).
* `make_scheduler`: learning-rate schedules stepped once per optimiser step.
* `save_resume_point` / `read_resume_point`: a finished epoch's checkpoint with
  what a resumed run needs (data, never code).
* `Progress`: a bar on a terminal, a log line every 10 % or 30 s otherwise.

`dataselect-train` (`dataselect.client.train`) is the script that composes them.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dataselect.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint, write_atomic
from dataselect.client.scorer import average_diagnostics
from dataselect.client.costs import Costs, time_to_target
from dataselect.engine import synchronize
from dataselect.errors import InvalidArgument
from dataselect.names import SCHEDULES

RESUME_FILE = "checkpoint.pt"



def make_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int):
    """A per-step learning-rate schedule over an estimated `total_steps` (steps past it keep the last rate):

    * constant: none (returns None);
    * cosine: from the base rate down to 0 along a half cosine;
    * onecycle: from base/25 up to the base rate over the first 30 % of steps, then down to base/10⁴
      along a half cosine (the one-cycle policy of Smith & Topin, 2019).
    """
    if name not in SCHEDULES:
        raise InvalidArgument(f"unknown learning-rate schedule {name!r}; use one of: {', '.join(SCHEDULES)}")
    if name == "constant":
        return None
    total = max(1, int(total_steps))

    def factor(step: int) -> float:
        t = min(1.0, step / total)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if t < 0.3:
            return 1.0 / 25 + (1.0 - 1.0 / 25) * t / 0.3
        return 1e-4 + (1.0 - 1e-4) * 0.5 * (1.0 + math.cos(math.pi * (t - 0.3) / 0.7))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Evaluator:
    """Accuracy (0..1) and mean cross-entropy on a test split, in eval mode: a split held as tensors
    (`inputs`/`labels`) is sliced directly, any other map-style data set goes through a DataLoader."""

    def __init__(self, model: nn.Module, test: Any, *, device: torch.device, micro_batch: int = 1024,
                 costs: Costs | None = None, dist: Any = None, num_workers: int = 0):
        self.model, self.test = model, test
        self.device, self.micro_batch, self.costs, self.dist = device, micro_batch, costs, dist
        self.num_workers = num_workers

    def __call__(self) -> tuple[float, float]:
        if self.dist is not None:  # rank 0 evaluates, every rank gets its figures
            return self.dist.evaluate(self._here, self.costs)
        return self._here()

    def _batches(self):
        inputs, labels = getattr(self.test, "inputs", None), getattr(self.test, "labels", None)
        if isinstance(inputs, torch.Tensor) and isinstance(labels, torch.Tensor):
            for start in range(0, len(labels), self.micro_batch):
                yield inputs[start:start + self.micro_batch], labels[start:start + self.micro_batch]
            return
        yield from torch.utils.data.DataLoader(self.test, batch_size=self.micro_batch, num_workers=self.num_workers)

    @torch.no_grad()
    def _here(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        model, device = self.model, self.device
        model.eval()
        correct, loss_sum, n = 0, 0.0, 0
        try:
            for x, y in self._batches():
                x, y = x.to(device), torch.as_tensor(y).to(device)
                logits = model(x).float()
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
                n += int(y.numel())
        finally:
            model.train()
        synchronize(device)
        if self.costs is not None:
            self.costs.eval_seconds += time.perf_counter() - t0
        n = max(1, n)
        return correct / n, loss_sum / n


@dataclass
class RunClock:
    """Budgets and evaluation points of a run, on the budget clock: wall-clock less data loading and
    evaluation, so the evaluations a run makes do not count against it."""

    costs: Costs
    t_start: float
    load_seconds: float = 0.0
    budget_seconds: float | None = None
    budget_samples: int | None = None
    target_accuracy: float | None = None
    eval_every: int | None = None
    dist: Any = None
    next_eval: int = 0
    eval_points: list[dict[str, Any]] = field(default_factory=list)
    target_seconds: float | None = None
    target_samples: int | None = None
    target_cpu_seconds: float | None = None
    cpu_start: float = field(default_factory=time.process_time)
    eval_cpu: float = 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.t_start - self.load_seconds - self.costs.eval_seconds

    def cpu_seconds(self) -> float:
        """CPU seconds this process spent training and selecting (evaluation excluded): a figure that a
        busy machine inflates far less than wall-clock."""
        return time.process_time() - self.cpu_start - self.eval_cpu

    def stop_reason(self) -> str | None:
        """Which budget is spent, if any (checked before each step)."""
        if self.target_seconds is not None:
            return "target_accuracy"
        if self.dist is not None:  # all ranks agree: samples over every rank, the slowest rank's clock
            return self.dist.budget_reason(self.budget_samples, self.budget_seconds, self.costs.samples_trained,
                                           self.seconds)
        if self.budget_samples is not None and self.costs.samples_trained >= self.budget_samples:
            return "budget_samples"
        if self.budget_seconds is not None and self.seconds() >= self.budget_seconds:
            return "budget_seconds"
        return None

    def eval_due(self) -> bool:
        return self.eval_every is not None and self.costs.samples_trained >= self.next_eval

    def evaluate(self, evaluate: Callable[[], tuple[float, float]]) -> tuple[float, float]:
        """Evaluate now (an --eval-every point, or an epoch's end); records the time to the target."""
        costs = self.costs
        last = self.eval_points[-1] if self.eval_points else None
        if last is not None and last["steps"] == costs.steps and last["samples_trained"] == costs.samples_trained:
            return last["test_accuracy"], last["test_loss"]  # nothing trained since: same model, same figures
        c0 = time.process_time()
        acc, loss = evaluate()
        self.eval_cpu += time.process_time() - c0
        seconds, cpu = self.seconds(), self.cpu_seconds()
        self.eval_points.append({"samples_trained": costs.samples_trained, "steps": costs.steps,
                                 "seconds": seconds, "cpu_seconds": cpu, "test_accuracy": acc, "test_loss": loss})
        if self.eval_every is not None:
            while self.next_eval <= costs.samples_trained:
                self.next_eval += self.eval_every
        if self.target_accuracy is not None and self.target_seconds is None and acc >= self.target_accuracy:
            # Interpolated between this evaluation and the one before, as `dataselect compare` reports it.
            points = self.eval_points
            self.target_seconds = time_to_target(points, self.target_accuracy)
            self.target_samples = round(time_to_target(points, self.target_accuracy, key="samples_trained"))
            self.target_cpu_seconds = time_to_target(points, self.target_accuracy, key="cpu_seconds")
        return acc, loss


class Progress:
    """Progress of one epoch: a tqdm bar on a terminal; off a terminal a plain line every 10 % or 30 s."""

    def __init__(self, epoch: int, epochs: int, total: int, *, enabled: bool, log: Callable[[str], None] | None,
                 every_seconds: float = 30.0):
        self.epoch, self.epochs, self.total, self.done = epoch, epochs, max(1, total), 0
        self.bar = None
        self.log = log if enabled else None
        self.every_seconds = every_seconds
        self.last_time, self.last_share = time.perf_counter(), 0.0
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False, dynamic_ncols=True)
            self.log = None

    def update(self, loss: float | None = None) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            return
        if self.log is None:
            return
        share = min(1.0, self.done / self.total)
        now = time.perf_counter()
        if share - self.last_share >= 0.1 or now - self.last_time >= self.every_seconds:
            self.last_share, self.last_time = share, now
            self.log(f"epoch {self.epoch}/{self.epochs}: {100 * share:.0f}% ({self.done}/{self.total} steps)"
                     + ("" if loss is None else f", loss {loss:.3f}"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def save_resume_point(path: Path, *, model_name: str, model_kwargs: dict, model: nn.Module,
                      optimizer: torch.optim.Optimizer, scheduler: Any, config: dict, version: int, step: int,
                      state: dict[str, Any]) -> None:
    """The run's checkpoint after a finished epoch: weights plus what resuming needs (plain data)."""
    ckpt = make_checkpoint(model_name, model_kwargs, model, version=version, step=step, optimizer=optimizer,
                           config=config)
    if scheduler is not None:
        state = {**state, "scheduler": scheduler.state_dict()}
    ckpt["resume"] = state
    save_checkpoint(ckpt, path)


def read_resume_point(output: str | Path) -> dict[str, Any]:
    path = Path(output) / RESUME_FILE
    if not path.is_file():
        raise InvalidArgument(f"--resume {output}: no {RESUME_FILE} there; resume needs the --output DIR of an earlier run")
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("resume"), dict) or not isinstance(ckpt.get("config"), dict):
        raise InvalidArgument(f"--resume {output}: {RESUME_FILE} was not written by dataselect-train (no resume state)")
    return ckpt


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a crash never leaves a half-written file."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text))


def mean_figures(items: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of each numeric figure over a list of diagnostics dicts (other values are dropped)."""
    return average_diagnostics(items)


def costs_dict(costs: Costs) -> dict[str, Any]:
    return asdict(costs)
