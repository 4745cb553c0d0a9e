"""Fitting a strategy's full-data warm-up (`warmup_epochs`) to the run it is asked for.

The trainer trains `warmup_epochs` full-data epochs before the first selection:
a fraction of an epoch in online mode (0.5 = half the epoch's steps), whole
epochs (rounded up) in subset and weighted modes. A warm-up that covers the
whole run leaves nothing to select, and the run silently becomes full-data
training. `fit_warmup` is what the strategies' `plan` calls to prevent that: such
a warm-up is cut to half the run with a warning, or, when half the run is less
than the strategy needs, the run is refused with an error that names the fixes.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from dataselect.errors import InvalidArgument
from dataselect.strategy import RunPlan


def warmup_span(warmup: float, mode: str) -> float:
    """Epochs the trainer spends on full data for `warmup` in `mode` (online: exact; else rounded up)."""
    return float(warmup) if mode == "online" else float(math.ceil(warmup))


def fit_warmup(name: str, options: dict[str, Any], run: RunPlan, *, minimum: float = 0.0,
               integer: bool = False, needs: str = "", fixes: str = "") -> dict[str, Any]:
    """`options` with a `warmup_epochs` that leaves part of the run to the strategy.

    Unchanged when the warm-up ends before the run does. Otherwise it becomes half
    the run (whole epochs unless the mode is online and the option takes
    fractions: `integer` False) with a warning; when half the run is below
    `minimum` (or zero when a warm-up is required), the run is refused with
    `InvalidArgument`. `needs` says what the warm-up is for, `fixes` replaces the
    default advice in the error.
    """
    warmup = options.get("warmup_epochs", 0) or 0
    epochs = run.epochs
    if epochs < 1 or warmup_span(warmup, run.mode) < epochs:
        return options
    fractional = run.mode == "online" and not integer
    half: float = epochs / 2 if fractional else epochs // 2
    why = f" ({needs})" if needs else ""
    if half < minimum or (minimum > 0 and half <= 0):
        least = math.ceil(2 * minimum) if fractional else 2 * math.ceil(minimum)
        advice = fixes or (f"Train for --epochs {max(least, 2)} or more, or use --select-fraction 1 to train on all "
                           "the data without selecting.")
        raise InvalidArgument(
            f"strategy {name!r} trains warmup_epochs={warmup:g} full-data epoch(s) before its first selection{why}; "
            f"a {epochs}-epoch run in {run.mode} mode would then select nothing. {advice}")
    new: float | int = int(half) if integer else float(half)
    warnings.warn(
        f"strategy {name!r}: warmup_epochs={warmup:g} would train all {epochs} epoch(s) on full data and never "
        f"select{why}; using warmup_epochs={new:g} (half the run). Pass warmup_epochs below the number of epochs "
        "(-o warmup_epochs=N) to choose it yourself.", stacklevel=2)
    return {**options, "warmup_epochs": new}
