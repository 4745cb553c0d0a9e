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
    samples_trained: int = 0
    samples_scored: int = 0
    steps: int = 0
    #: Whole-training-set selections (subset and weighted modes).
    refreshes: int = 0
    #: Epochs trained on the full data (warm-up, or no scorer).
    full_data_epochs: int = 0


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
