"""Where a run's time goes: training apart from selection, and the table that shows it.

`Costs` is filled by `dataselect.Session` (selection: scoring wait, server
compute, transfer, pushes, reports, data) and by whoever times the training
steps (`dataselect-train` synchronises the device around each step; a loop
of your own gets the time spent between batches as its estimate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
    #: Training the irreducible-loss model (RHO-LOSS), before the first selection; counted in score_seconds too.
    irreducible_seconds: float = 0.0
    samples_trained: int = 0
    samples_scored: int = 0
    steps: int = 0
    #: Whole-training-set selections (subset and weighted modes).
    refreshes: int = 0
    #: Epochs trained on the full data (warm-up, or no scorer).
    full_data_epochs: int = 0


def time_to_target(points: list[dict[str, Any]], target: float, *, key: str = "seconds") -> float | None:
    """When test accuracy first reached `target`: linearly interpolated between the last evaluation
    below it and the first at or above it (`key` of those points: "seconds" on the budget clock, i.e.
    wall-clock less data loading and evaluation). When the first evaluation already reaches it, its
    own time: nothing was measured before it, so that is the honest upper bound. None if never."""
    pts = sorted(((float(p[key]), float(p["test_accuracy"])) for p in points
                  if p.get(key) is not None and p.get("test_accuracy") is not None), key=lambda p: p[0])
    prev: tuple[float, float] | None = None
    for t, acc in pts:
        if acc >= target:
            if prev is None:
                return t
            t0, a0 = prev
            return t0 + (target - a0) / (acc - a0) * (t - t0)  # a0 < target <= acc
        prev = (t, acc)
    return None


def selection_payoff(summary: dict[str, Any]) -> dict[str, Any]:
    """Did selection pay off? An estimate from the run's own figures.

    Training on every sample would have cost about `train_seconds / samples_trained`
    per sample (this run's own training cost per sample) times the samples a
    full-data run trains on: every training sample, once per epoch run. Against
    it stand what this run spent training and waiting for selection (scoring
    wait, reports, pushes). Warm-up epochs count on both sides. None for runs
    that trained nothing, stopped early, or did no selection.
    """
    empty = {"estimated_full_data_train_seconds": None, "estimated_saving_seconds": None,
             "estimated_saving_fraction": None}
    trained = summary.get("samples_trained") or 0
    if not trained or summary.get("stopped_by") or summary.get("full_data"):
        return empty
    per_sample = summary["train_seconds"] / trained
    full = per_sample * summary["train_samples"] * summary.get("epochs_completed", summary["epochs"])
    spent = (summary["train_seconds"] + summary["score_seconds"] + summary["report_seconds"]
             + summary["checkpoint_seconds"])
    saving = full - spent
    return {"estimated_full_data_train_seconds": full, "estimated_saving_seconds": saving,
            "estimated_saving_fraction": saving / full if full > 0 else None}


def format_cost_table(summary: dict[str, Any]) -> str:
    """A short human table of where the wall time went, and whether selection paid off."""
    # Under torchrun the seconds are summed over ranks: compare them with wall x ranks.
    wall = (summary["wall_seconds"] or 1e-9) * summary.get("world_size", 1)
    remote = summary.get("scorer") == "remote"
    overlap = bool(summary.get("overlap"))
    lines = [
        f"{summary['strategy']} on {summary['dataset']} ({summary['model']}, {summary['epochs']} epoch(s), "
        f"{summary['scorer']} scorer): test accuracy {summary['test_accuracy']:.4f}",
        f"{'where the time went':<32}{'seconds':>10}{'% wall':>9}",
    ]

    def row(label: str, seconds: float) -> None:
        lines.append(f"{label:<32}{seconds:>10.2f}{100 * seconds / wall:>8.1f}%")

    row("training (fwd+bwd+opt)", summary["train_seconds"])
    row("waiting for selections", summary["score_seconds"])
    if summary.get("irreducible_seconds"):
        row("  of which irreducible model", summary["irreducible_seconds"])
    if summary.get("report_seconds"):
        row("sending training losses", summary["report_seconds"])
    if summary.get("checkpoint_pushes"):
        row("model pushes" if remote else "model copies to the scorer", summary["checkpoint_seconds"])
    row("evaluation", summary["eval_seconds"])
    row("data", summary["data_seconds"])
    lines.append(f"{'wall':<32}{summary['wall_seconds']:>10.2f}")
    if summary.get("scorer") not in (None, "none"):
        where = "on the server" if remote else "in this process"
        note = f"scoring compute {where}: {summary['server_compute_seconds']:.2f} s"
        if overlap:
            note += (f", {100 * summary.get('hidden_score_fraction', 0.0):.0f}% of it hidden behind training; "
                     f"selections up to {summary.get('staleness_max_steps', 0)} step(s) stale")
        if remote:
            note += f"; wire and encoding {summary['transfer_seconds']:.2f} s (within the rows above)"
        lines.append(note)
    aux = summary.get("auxiliary_loss")
    if aux:
        params = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in aux["params"].items())
        rho = summary.get("diagnostics", {}).get("proxy_rank_correlation")
        lines.append(f"auxiliary loss {aux['name']} (weight {aux['weight']:g}{', ' + params if params else ''}) "
                     "trained jointly (its cost is in training)"
                     + ("" if rho is None else f"; the proxy's margins rank like the full model's: {rho:.3f}"))
    lines.append(f"samples trained {summary['samples_trained']}, scored {summary['samples_scored']}"
                 + (f", model pushes {summary['checkpoint_pushes']} ({summary['checkpoint_bytes']} bytes)"
                    if remote else ""))
    saving = summary.get("estimated_saving_seconds")
    if saving is not None:
        full = summary["estimated_full_data_train_seconds"]
        verdict = "saved" if saving >= 0 else "cost"
        lines.append(f"estimate: training on every sample would have taken about {full:.1f} s; selection "
                     f"{verdict} about {abs(saving):.1f} s ({100 * abs(saving) / full:.0f}%) of that"
                     + ("" if not remote else ", not counting the server's own compute"))
    return "\n".join(lines)
