"""`dataselect compare`: run strategies × models × datasets × repeats and report accuracy against cost.

Each run is a subprocess of the real trainer CLI (`python -m dataselect.client.cli`),
so one crashing run (out of memory, a plugin bug) cannot take the others down, each
run gets fresh memory and a fresh CUDA context, and every `dataselect-train` option
reaches the run exactly as the trainer parses it.

The full-data baseline (`random` at `--select-fraction 1.0`, labelled `full`) is
always run: it is the reference for speed-up and accuracy difference and, unless
`--target` is given, sets the target accuracy for time-to-accuracy.

Layout of OUTPUT:
    config.json                 the comparison config, command, package versions, device
    runs/<dataset>/<model>/<strategy>/seed<k>/
        summary.json, metrics.jsonl   written by the trainer
        stdout.txt, stderr.txt        the trainer's output
        error.txt                     only for a failed run: its last stderr line
    runs.csv                    one row per run (status, accuracy, wall seconds, error)
    results.csv, results.md     one row per strategy × model × dataset
    accuracy_vs_time.png, cost_breakdown.png

Time to accuracy: the seconds on the run's budget clock (wall-clock less data
loading and evaluation, as `summary.json` counts them) at which its test accuracy
first reaches the target, linearly interpolated between the last evaluation below
the target and the first at or above it (`dataselect.client.costs.time_to_target`,
the one definition the trainer uses too; `--eval-every` gives more points than the
epoch ends). When the first evaluation already reaches the target, its own time is
reported: nothing was measured before it, so it is the honest upper bound. Runs
that never reach it count as "not reached"; the table shows the mean over the runs
that reached it and "k/n reached".

Variants (`--variants clean,noise=0.2,imbalance=10`): each dataset is also run with
`--label-noise` / `--imbalance` (joined with `+` for both); a variant is reported as
its own dataset row `mnist [noise=0.2]` with its own full-data baseline and target,
always measured on the unchanged test set.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata as md
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import click
from tqdm import tqdm

from dataselect import registry
from dataselect.client.config import to_argv
from dataselect.client.costs import time_to_target
from dataselect.datasets import check_dataset_spec
from dataselect.errors import DataselectError, InvalidArgument
from dataselect.registry import get_model_builder, get_strategy

FULL = "full"
"""Label of the full-data baseline in paths, tables and plots."""

DEFAULT_TARGET_MARGIN = 0.005
"""Default target = full-data final mean accuracy minus this (half a point)."""

SUMMARY_METRICS = (
    "test_accuracy",
    "noisy_share",
    "wall_seconds",
    "train_seconds",
    "score_seconds",
    "server_compute_seconds",
    "samples_trained",
    "samples_scored",
)
"""summary.json fields aggregated as mean ± std over repeats."""


def default_trainer_cmd() -> list[str]:
    return [sys.executable, "-m", "dataselect.client.cli"]


@dataclass
class CompareConfig:
    """What to compare and how. `trainer_args` go unchanged to every run."""

    output: Path
    strategies: list[str]
    models: list[str] = field(default_factory=lambda: ["cnn-small"])
    datasets: list[str] = field(default_factory=lambda: ["mnist"])
    #: Dataset variants: "clean", "noise=P", "imbalance=R", or both joined with "+".
    variants: list[str] = field(default_factory=lambda: ["clean"])
    epochs: int = 3
    repeats: int = 3
    seed: int = 0
    target: float | None = None
    budget_seconds: float | None = None
    budget_samples: int | None = None
    resume: bool = False
    device: str | None = None
    trainer_args: list[str] = field(default_factory=list)
    # Injectable so tests can run a fake trainer; None = the real CLI in this interpreter.
    trainer_cmd: list[str] | None = None

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if self.repeats < 1:
            raise InvalidArgument(f"repeats must be at least 1, got {self.repeats}")
        if self.epochs < 1:
            raise InvalidArgument(f"epochs must be at least 1, got {self.epochs}")
        if not self.models or not self.datasets:
            raise InvalidArgument("give at least one model and one dataset")
        if self.target is not None and not 0.0 < self.target <= 1.0:
            raise InvalidArgument(f"target accuracy is a fraction in (0, 1], got {self.target}; e.g. --target 0.99")
        if not self.variants:
            raise InvalidArgument("give at least one variant (clean, noise=P, imbalance=R)")
        for v in self.variants:
            variant_args(v)  # a typo fails now
        # The baseline is always run; naming it again would only duplicate it.
        self.strategies = [s for s in dict.fromkeys(self.strategies) if s != FULL]

    def labels(self) -> list[str]:
        """Strategy labels in table order: the baseline first."""
        return [FULL, *self.strategies]


def variant_args(variant: str) -> list[str]:
    """Trainer options of a variant: "clean" -> [], "noise=0.2" -> --label-noise 0.2, "imbalance=10" ->
    --imbalance 10, "noise=0.2+imbalance=10" -> both."""
    out: list[str] = []
    for part in variant.split("+"):
        key, sep, value = part.strip().partition("=")
        if key == "clean" and not sep:
            continue
        flag = {"noise": "--label-noise", "imbalance": "--imbalance"}.get(key)
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if flag is None or not sep or not math.isfinite(number):
            raise InvalidArgument(f"variant {variant!r}: use clean, noise=P (label noise rate in [0, 1)), "
                                  "imbalance=R (largest/smallest class, >= 1), or both joined with '+'")
        out += [flag, value]
    return out


@dataclass
class RunSpec:
    dataset: str
    model: str
    strategy: str  # a label: a registered strategy name or FULL
    seed: int
    variant: str = "clean"

    @property
    def label(self) -> str:
        """The dataset as reported: `mnist`, or `mnist [noise=0.2]` for a variant."""
        return self.dataset if self.variant == "clean" else f"{self.dataset} [{self.variant}]"

    def run_dir(self, output: Path) -> Path:
        where = Path(output) / "runs" / path_label(self.dataset)
        if self.variant != "clean":
            where = where / path_label(self.variant)
        return where / self.model / self.strategy / f"seed{self.seed}"

    @property
    def name(self) -> str:
        return f"{self.label}/{self.model}/{self.strategy}/seed{self.seed}"


@dataclass
class RunRecord:
    """One run's outcome: the trainer's summary and per-epoch metrics, or its error."""

    dataset: str
    model: str
    strategy: str
    seed: int
    summary: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    resumed: bool = False

    @property
    def ok(self) -> bool:
        return self.summary is not None and self.error is None


@dataclass
class ResultRow:
    """One strategy × model × dataset: statistics over its repeats."""

    dataset: str
    model: str
    strategy: str
    runs: int
    runs_ok: int
    stats: dict[str, tuple[float, float]]  # metric -> (mean, std) over successful runs
    speedup: float  # full-data mean wall / this mean wall
    delta_accuracy_points: float  # (this mean accuracy - full mean accuracy) * 100
    target: float | None
    time_to_target: tuple[float, float]  # (mean, std) over runs that reached the target
    target_reached: int
    errors: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- aggregation


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value; NaN for none)."""
    xs = [float(v) for v in values if v is not None and not _isnan(v)]
    if not xs:
        return math.nan, math.nan
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, math.sqrt(var)


def speedup(full_wall: float, wall: float) -> float:
    """How many times faster than full-data training (>1 = faster)."""
    if _isnan(full_wall) or _isnan(wall) or wall <= 0:
        return math.nan
    return full_wall / wall


def accuracy_difference_points(accuracy: float, full_accuracy: float) -> float:
    """Accuracy minus the full-data accuracy, in percentage points."""
    return (accuracy - full_accuracy) * 100.0


def time_to_accuracy(metrics: Sequence[dict[str, Any]], target: float) -> float | None:
    """Wall-clock seconds (epoch lines' `wall_seconds`) at which test accuracy first reaches `target`;
    see `dataselect.client.costs.time_to_target`, the one definition."""
    return time_to_target(list(metrics), target, key="wall_seconds")


def run_time_to_target(record: RunRecord, target: float) -> float | None:
    """A run's time to `target`: from its evaluations on the budget clock (wall-clock less data loading
    and evaluation, as `summary.json`'s `time_to_target_seconds`), else from its epoch lines."""
    points = (record.summary or {}).get("eval_points")
    if points:
        return time_to_target(points, target)
    return time_to_accuracy(record.metrics, target)


def default_target(full_records: Sequence[RunRecord]) -> float | None:
    """Full-data final mean accuracy minus half a point; None when no baseline run succeeded."""
    acc, _ = mean_std(r.summary["test_accuracy"] for r in full_records if r.ok)
    return None if _isnan(acc) else acc - DEFAULT_TARGET_MARGIN


def aggregate(records: Sequence[RunRecord], target: float | None = None) -> list[ResultRow]:
    """One row per dataset × model × strategy, baseline first, in order of first appearance.

    `target=None` gives each dataset × model its own default target (its full-data
    accuracy − 0.5 points), since accuracies differ across them.
    """
    groups: dict[tuple[str, str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.dataset, r.model, r.strategy), []).append(r)

    def order(key: tuple[str, str, str]) -> tuple:
        firsts = list(dict.fromkeys((k[0], k[1]) for k in groups))
        return (firsts.index(key[:2]), key[2] != FULL, list(groups).index(key))

    rows = []
    for key in sorted(groups, key=order):
        dataset, model, strategy = key
        runs = groups[key]
        ok = [r for r in runs if r.ok]
        stats = {m: mean_std(_metric(r.summary, m) for r in ok) for m in SUMMARY_METRICS}
        full = [r for r in groups.get((dataset, model, FULL), []) if r.ok]
        full_acc, _ = mean_std(r.summary["test_accuracy"] for r in full)
        full_wall, _ = mean_std(_num(r.summary.get("wall_seconds")) for r in full)
        row_target = target if target is not None else default_target(full)
        times = [run_time_to_target(r, row_target) for r in ok] if row_target is not None else []
        reached = [t for t in times if t is not None]
        rows.append(ResultRow(
            dataset=dataset, model=model, strategy=strategy, runs=len(runs), runs_ok=len(ok),
            stats=stats,
            speedup=speedup(full_wall, stats["wall_seconds"][0]),
            delta_accuracy_points=accuracy_difference_points(stats["test_accuracy"][0], full_acc),
            target=row_target,
            time_to_target=mean_std(reached),
            target_reached=len(reached),
            errors=_grouped_errors(runs),
        ))
    return rows


def _metric(summary: dict[str, Any], name: str) -> float | None:
    """A summary figure; `noisy_share` is the share of the samples trained on whose label was flipped."""
    if name == "noisy_share":
        noisy, trained = summary.get("noisy_samples_trained"), summary.get("samples_trained")
        return None if noisy is None or not trained else noisy / trained
    return _num(summary.get(name))


def _grouped_errors(runs: Sequence[RunRecord]) -> list[str]:
    """'seed0, seed2: msg' per distinct error: a systematic failure (missing data) hits every
    repeat with the same message, which should not fill the table n times."""
    by_msg: dict[str, list[str]] = {}
    for r in runs:
        if not r.ok:
            by_msg.setdefault(r.error or "failed", []).append(f"seed{r.seed}")
    return [f"{', '.join(seeds)}: {msg}" for msg, seeds in by_msg.items()]


def mean_curve(records: Sequence[RunRecord]) -> tuple[list[float], list[float], list[float]]:
    """Per-epoch mean wall-clock, mean accuracy and accuracy std over the given runs.

    Epochs are matched by their `epoch` number; a budget-stopped run that has fewer
    epochs simply contributes to fewer points.
    """
    by_epoch: dict[Any, list[tuple[float, float]]] = {}
    for r in records:
        for m in r.metrics:
            if m.get("test_accuracy") is None or m.get("wall_seconds") is None:
                continue
            by_epoch.setdefault(m["epoch"], []).append((float(m["wall_seconds"]), float(m["test_accuracy"])))
    ts, accs, stds = [], [], []
    for epoch in sorted(by_epoch):
        pts = by_epoch[epoch]
        ts.append(mean_std(p[0] for p in pts)[0])
        a, s = mean_std(p[1] for p in pts)
        accs.append(a)
        stds.append(s)
    return ts, accs, stds


# ---------------------------------------------------------------- tables

CSV_COLUMNS = (
    ["dataset", "model", "strategy", "runs", "runs_ok"]
    + [f"{m}_{s}" for m in SUMMARY_METRICS for s in ("mean", "std")]
    + ["speedup", "delta_accuracy_points", "target_accuracy", "time_to_target_mean",
       "time_to_target_std", "time_to_target_reached", "errors"]
)


def row_to_csv(row: ResultRow) -> dict[str, Any]:
    out: dict[str, Any] = {"dataset": row.dataset, "model": row.model, "strategy": row.strategy,
                           "runs": row.runs, "runs_ok": row.runs_ok}
    for m in SUMMARY_METRICS:
        out[f"{m}_mean"], out[f"{m}_std"] = (_csv_num(v) for v in row.stats[m])
    out.update(
        speedup=_csv_num(row.speedup),
        delta_accuracy_points=_csv_num(row.delta_accuracy_points),
        target_accuracy=_csv_num(row.target),
        time_to_target_mean=_csv_num(row.time_to_target[0]),
        time_to_target_std=_csv_num(row.time_to_target[1]),
        time_to_target_reached=row.target_reached,
        errors=" | ".join(row.errors),
    )
    return out


def write_results_csv(rows: Sequence[ResultRow], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow(row_to_csv(row))


def markdown_table(rows: Sequence[ResultRow]) -> str:
    """Mean ± std over repeats; accuracies in percent, times in seconds."""
    noisy = any(not _isnan(r.stats["noisy_share"][0]) for r in rows)
    header = ["dataset", "model", "strategy", "runs ok", "test acc (%)", "wall (s)", "train (s)",
              "score (s)", "server (s)", "samples trained", "samples scored", "speed-up",
              "Δacc (pts)", "target (%)", "time to target (s)", *(["noisy trained (%)"] if noisy else []), "errors"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        s = r.stats
        if r.target is None:
            ttt = "—"
        elif r.target_reached:
            ttt = f"{_pm(*r.time_to_target, 1)} ({r.target_reached}/{r.runs_ok} reached)"
        else:
            ttt = f"not reached (0/{r.runs_ok})"
        cells = [
            r.dataset, r.model, r.strategy, f"{r.runs_ok}/{r.runs}",
            _pm(s["test_accuracy"][0] * 100, s["test_accuracy"][1] * 100, 2),
            _pm(*s["wall_seconds"], 1), _pm(*s["train_seconds"], 1), _pm(*s["score_seconds"], 1),
            _pm(*s["server_compute_seconds"], 1), _pm(*s["samples_trained"], 0),
            _pm(*s["samples_scored"], 0),
            "—" if _isnan(r.speedup) else f"{r.speedup:.2f}×",
            "—" if _isnan(r.delta_accuracy_points) else f"{r.delta_accuracy_points:+.2f}",
            "—" if r.target is None else f"{r.target * 100:.2f}",
            ttt,
            *([_pm(s["noisy_share"][0] * 100, s["noisy_share"][1] * 100, 1)] if noisy else []),
            "; ".join(e.replace("|", "\\|") for e in r.errors),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_runs_csv(records: Sequence[RunRecord], path: Path) -> None:
    cols = ["dataset", "model", "strategy", "seed", "status", "test_accuracy", "wall_seconds", "error"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in records:
            w.writerow({
                "dataset": r.dataset, "model": r.model, "strategy": r.strategy, "seed": r.seed,
                "status": ("resumed" if r.resumed else "ok") if r.ok else "failed",
                "test_accuracy": r.summary.get("test_accuracy", "") if r.ok else "",
                "wall_seconds": r.summary.get("wall_seconds", "") if r.ok else "",
                "error": r.error or "",
            })


# ---------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DataselectError(
            'plots need matplotlib: pip install "dataselect[plots]" (the tables were written without it)'
        ) from None
    # Agg: the comparison usually runs headless (servers, CI); never open a window.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _panels(records_or_rows: Iterable[Any]) -> tuple[list[str], list[str]]:
    datasets = list(dict.fromkeys(x.dataset for x in records_or_rows))
    models = list(dict.fromkeys(x.model for x in records_or_rows))
    return datasets, models


def plot_accuracy_vs_time(records: Sequence[RunRecord], targets: dict[tuple[str, str], float] | None = None):
    """Figure: test accuracy against cumulative wall-clock, one line per strategy (mean over
    repeats, shaded ± std), one panel per model (rows: datasets). Returns the Figure."""
    plt = _pyplot()
    ok = [r for r in records if r.ok]
    datasets, models = _panels(ok or records)
    fig, axes = plt.subplots(len(datasets), len(models), figsize=(5.5 * len(models), 4.2 * len(datasets)),
                             squeeze=False)
    strategies = list(dict.fromkeys(r.strategy for r in records))
    colours = {s: f"C{i % 10}" for i, s in enumerate(strategies)}
    for i, dataset in enumerate(datasets):
        for j, model in enumerate(models):
            ax = axes[i][j]
            for strategy in strategies:
                runs = [r for r in ok if (r.dataset, r.model, r.strategy) == (dataset, model, strategy)]
                ts, accs, stds = mean_curve(runs)
                if not ts:
                    continue
                pct = [a * 100 for a in accs]
                ax.plot(ts, pct, marker="o", color=colours[strategy], label=f"{strategy} (n={len(runs)})",
                        linestyle="--" if strategy == FULL else "-")
                if len(runs) > 1:
                    ax.fill_between(ts, [a - s * 100 for a, s in zip(pct, stds)],
                                    [a + s * 100 for a, s in zip(pct, stds)], color=colours[strategy], alpha=0.15)
            target = (targets or {}).get((dataset, model))
            if target is not None:
                # In the legend rather than as text on the plot, where it would sit on the curves.
                ax.axhline(target * 100, color="grey", linewidth=0.8, linestyle=":",
                           label=f"target {target * 100:.2f}%")
            ax.set_title(f"{dataset} / {model}")
            ax.set_xlabel("cumulative wall-clock (s)")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Test accuracy vs wall-clock per epoch (mean over repeats)")
    fig.tight_layout()
    return fig


def plot_cost_breakdown(rows: Sequence[ResultRow]):
    """Figure: stacked bars per strategy of training / scoring / other (wall − train − score)
    mean seconds, one panel per model (rows: datasets). Returns the Figure."""
    plt = _pyplot()
    rows = [r for r in rows if r.runs_ok]
    datasets, models = _panels(rows)
    fig, axes = plt.subplots(max(1, len(datasets)), max(1, len(models)),
                             figsize=(5.5 * max(1, len(models)), 4.2 * max(1, len(datasets))), squeeze=False)
    for i, dataset in enumerate(datasets):
        for j, model in enumerate(models):
            ax = axes[i][j]
            panel = [r for r in rows if (r.dataset, r.model) == (dataset, model)]
            names = [r.strategy for r in panel]
            train = [_zero(r.stats["train_seconds"][0]) for r in panel]
            score = [_zero(r.stats["score_seconds"][0]) for r in panel]
            # Other = evaluation, data loading, checkpoint transfer, start-up: all the wall-clock
            # that is neither training nor scoring. Clipped: timers can overlap by rounding.
            other = [max(0.0, _zero(r.stats["wall_seconds"][0]) - t - s) for r, t, s in zip(panel, train, score)]
            x = range(len(panel))
            ax.bar(x, train, label="training", color="C0")
            ax.bar(x, score, bottom=train, label="scoring", color="C1")
            ax.bar(x, other, bottom=[t + s for t, s in zip(train, score)], label="other", color="C7")
            ax.set_xticks(list(x), names, rotation=20, ha="right")
            ax.set_title(f"{dataset} / {model}")
            ax.set_ylabel("mean seconds per run")
            ax.legend(fontsize=8)
            ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Where the time goes: training / scoring / other (mean over repeats)")
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> None:
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


# ---------------------------------------------------------------- running


def path_label(name: str) -> str:
    """`name` as one folder name: `imagefolder:data/pets` -> `imagefolder_data_pets-<hash>` (the hash keeps
    names that differ only in punctuation apart)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "dataset"
    if safe == name:
        return name
    return f"{safe[:60]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def validate_names(config: CompareConfig) -> None:
    """Fail before any run on a misspelt strategy, model or dataset (the error lists the known names)."""
    for s in config.strategies:
        get_strategy(s)
    for m in config.models:
        get_model_builder(m)
    for d in config.datasets:
        check_dataset_spec(d)


def plan_runs(config: CompareConfig) -> list[RunSpec]:
    """All runs in execution order.

    Strategies are interleaved within each repeat (not all repeats of one strategy in a
    row) so slow drift of the machine (thermal throttling, other load) spreads over all
    strategies instead of biasing one.
    """
    return [
        RunSpec(dataset, model, label, config.seed + r, variant)
        for dataset in config.datasets
        for variant in config.variants
        for model in config.models
        for r in range(config.repeats)
        for label in config.labels()
    ]


# Options the baseline must not inherit: it is defined by random at fraction 1.0, and
# strategy options (-o) meant for the compared strategies may not be valid for random.
_BASELINE_DROPPED = {"--select-fraction": True, "--option": True, "-o": True}


def _without_options(args: Sequence[str], dropped: dict[str, bool]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in dropped:
            skip = "=" not in a and dropped[name]
            continue
        out.append(a)
    return out


def trainer_argv(config: CompareConfig, spec: RunSpec, run_dir: Path) -> list[str]:
    cmd = list(config.trainer_cmd or default_trainer_cmd())
    strategy = "random" if spec.strategy == FULL else spec.strategy
    cmd += ["--strategy", strategy, "--model", spec.model, "--dataset", spec.dataset,
            "--epochs", str(config.epochs), "--seed", str(spec.seed), "--output", str(run_dir), "--quiet",
            *variant_args(spec.variant)]
    if config.device:
        cmd += ["--device", config.device]
    if config.budget_seconds is not None:
        cmd += ["--budget-seconds", str(config.budget_seconds)]
    if config.budget_samples is not None:
        cmd += ["--budget-samples", str(config.budget_samples)]
    if spec.strategy == FULL:
        cmd += _without_options(config.trainer_args, _BASELINE_DROPPED) + ["--select-fraction", "1.0"]
    else:
        cmd += list(config.trainer_args)
    return cmd


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def load_run(spec: RunSpec, run_dir: Path) -> RunRecord:
    """A finished run from its folder (summary.json, metrics.jsonl)."""
    rec = RunRecord(spec.label, spec.model, spec.strategy, spec.seed)
    rec.summary = json.loads((run_dir / "summary.json").read_text())
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.exists():
        rec.metrics = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    return rec


def execute_run(config: CompareConfig, spec: RunSpec) -> RunRecord:
    """Run the trainer for one spec; a failure is recorded, never raised."""
    run_dir = spec.run_dir(config.output)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Stale files from an earlier attempt must not pass for this run's results.
    for stale in ("summary.json", "metrics.jsonl", "error.txt"):
        (run_dir / stale).unlink(missing_ok=True)
    argv = trainer_argv(config, spec, run_dir)
    (run_dir / "command.txt").write_text(" ".join(argv) + "\n")
    with open(run_dir / "stdout.txt", "w") as out, open(run_dir / "stderr.txt", "w") as err:
        try:
            proc = subprocess.run(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
            code: int | None = proc.returncode
        except OSError as e:  # trainer command missing or not executable
            err.write(f"could not start the trainer: {e}\n")
            code = None
    stderr = (run_dir / "stderr.txt").read_text(errors="replace")
    error = None
    if code != 0:
        error = _last_line(stderr) or f"trainer exited with status {code}"
        if code is not None and code < 0:
            error = f"killed by signal {-code}: {error}"
    elif not (run_dir / "summary.json").exists():
        error = "trainer exited 0 but wrote no summary.json"
    if error is None:
        try:
            return load_run(spec, run_dir)
        except (OSError, ValueError) as e:
            error = f"unreadable trainer output: {e}"
    (run_dir / "error.txt").write_text(error + "\n")
    return RunRecord(spec.label, spec.model, spec.strategy, spec.seed, error=error)


def package_versions() -> dict[str, str]:
    out = {}
    for dist in ("dataselect", "torch", "torchvision", "numpy", "matplotlib"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    out["python"] = platform.python_version()
    out["platform"] = platform.platform()
    return out


def write_config(config: CompareConfig) -> dict[str, Any]:
    cfg = asdict(config)
    cfg["output"] = str(config.output)
    info = {
        "config": cfg,
        "command": sys.argv,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": package_versions(),
        "device_requested": config.device or _option_value(config.trainer_args, "--device") or "trainer default",
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
    }
    (config.output / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _option_value(args: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


@dataclass
class ComparisonResults:
    records: list[RunRecord]
    rows: list[ResultRow]
    markdown: str
    output: Path
    plot_error: str | None = None

    @property
    def all_failed(self) -> bool:
        return not any(r.ok for r in self.records)


def _echo(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_comparison(config: CompareConfig, log: Callable[[str], None] = _echo,
                   progress: bool | None = None) -> ComparisonResults:
    """Run every planned run (skipping finished ones under `resume`), then write tables and plots.

    `progress`: a tqdm bar (None = only when stderr is a terminal); otherwise one log
    line per run.
    """
    validate_names(config)
    config.output.mkdir(parents=True, exist_ok=True)
    write_config(config)
    specs = plan_runs(config)
    if progress is None:
        progress = sys.stderr.isatty()
    bar = None
    if progress:
        bar = tqdm(total=len(specs), unit="run", desc="compare", file=sys.stderr)
        say = bar.write
    else:
        say = log
    records: list[RunRecord] = []
    try:
        for n, spec in enumerate(specs, 1):
            run_dir = spec.run_dir(config.output)
            if config.resume and (run_dir / "summary.json").exists():
                try:
                    rec = load_run(spec, run_dir)
                    rec.resumed = True
                except (OSError, ValueError):
                    rec = execute_run(config, spec)  # a half-written summary is not a finished run
            else:
                if bar is not None:
                    bar.set_postfix_str(spec.name)
                rec = execute_run(config, spec)
            records.append(rec)
            if rec.ok:
                status = "resumed" if rec.resumed else "ok"
                acc = rec.summary.get("test_accuracy")
                wall = rec.summary.get("wall_seconds")
                detail = f"acc {acc * 100:.2f}%, {wall:.1f} s" if isinstance(acc, (int, float)) and isinstance(wall, (int, float)) else ""
                msg = f"[{n}/{len(specs)}] {spec.name}: {status} {detail}".rstrip()
            else:
                msg = f"[{n}/{len(specs)}] {spec.name}: FAILED: {rec.error} (see {run_dir / 'stderr.txt'})"
            if bar is not None:
                if not rec.ok:
                    say(msg)
                bar.update(1)
            else:
                say(msg)
    finally:
        if bar is not None:
            bar.close()
    return report(config, records, log)


def report(config: CompareConfig, records: list[RunRecord], log: Callable[[str], None] = _echo) -> ComparisonResults:
    """Aggregate finished runs into results.csv / results.md / runs.csv and the two plots."""
    out = config.output
    rows = aggregate(records, config.target)
    write_runs_csv(records, out / "runs.csv")
    write_results_csv(rows, out / "results.csv")
    md_text = markdown_table(rows)
    budget = ("equal epochs" if config.budget_seconds is None and config.budget_samples is None
              else f"budget: {config.budget_seconds or '-'} s / {config.budget_samples or '-'} samples")
    (out / "results.md").write_text(
        f"Mean ± std over {config.repeats} repeat(s) (seeds {config.seed}..{config.seed + config.repeats - 1}), "
        f"{config.epochs} epoch(s), {budget}. Speed-up and Δacc are against `{FULL}` (full-data training).\n\n"
        + md_text
    )
    results = ComparisonResults(records, rows, md_text, out)
    try:
        targets = {(r.dataset, r.model): r.target for r in rows if r.strategy == FULL and r.target is not None}
        if config.target is not None:
            targets = {(r.dataset, r.model): config.target for r in rows}
        if any(r.ok for r in records):
            save_figure(plot_accuracy_vs_time(records, targets), out / "accuracy_vs_time.png")
            save_figure(plot_cost_breakdown(rows), out / "cost_breakdown.png")
    except DataselectError as e:
        results.plot_error = str(e)
        log(f"warning: {e}")
    return results


# ---------------------------------------------------------------- the command's body

#: Trainer options `dataselect compare` accepts but sets on each run's command line itself (`trainer_argv`).
RUN_OWNS = ("device", "budget_seconds", "budget_samples")


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def run_from_command_line(strategies, models, datasets, variants, epochs, repeats, seed, output, target, resume,
                          extra, **trainer) -> None:
    """`dataselect compare`'s body, given its parsed options (`dataselect.client.main`)."""
    passthrough = to_argv(trainer, exclude=RUN_OWNS) + list(extra)
    try:
        config = CompareConfig(
            output=Path(output),
            strategies=_split(strategies) if strategies else list(registry.strategies()),
            models=_split(models), datasets=_split(datasets), variants=_split(variants), epochs=epochs, repeats=repeats, seed=seed,
            target=target, budget_seconds=trainer["budget_seconds"], budget_samples=trainer["budget_samples"],
            resume=resume, device=trainer["device"], trainer_args=passthrough,
        )
        results = run_comparison(config)
    except InvalidArgument as e:
        raise click.UsageError(str(e)) from None
    except DataselectError as e:
        raise click.ClickException(str(e)) from None
    click.echo(results.markdown)
    click.echo(f"results in {results.output}", err=True)
    if results.all_failed:
        raise click.ClickException(
            f"every run failed; see error.txt and stderr.txt under {results.output / 'runs'}")


# ---------------------------------------------------------------- helpers


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _zero(x: float) -> float:
    return 0.0 if _isnan(x) else x


def _pm(mean: float, std: float, digits: int) -> str:
    if _isnan(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _csv_num(x: Any) -> Any:
    return "" if x is None or _isnan(x) else x
