"""MRMC: maximum loss reduction as maximum contribution (“Maximum Reduction as Maximum Contribution”, ICML 2025)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dataselect.errors import InvalidArgument
from dataselect.plugins.strategies.state import IdTable
from dataselect.plugins.strategies.warmup import fit_warmup
from dataselect.policies import apply_policy, topk
from dataselect.strategy import Option, Pool, Progress, Report, RunPlan, Selection, Strategy

#: The most warm-up epochs MRMC records: its loss table holds samples × warmup_epochs float64 values
#: (60,000 samples × 100 = 48 MB); the paper warms up for 10 to 20 epochs.
MAX_MRMC_WARMUP = 100


def fit_reduction(losses: torch.Tensor, horizon: int) -> torch.Tensor:
    """φ_i = q_i (1 − w_i^−R) from per-epoch losses [n, R'] (NaN = not recorded).

    Column j holds epoch r = j + 1. Fits log ℓ = log q − r log w by least
    squares; log w is clamped at 0 (w ≥ 1: a loss that does not fall gives
    no reduction). Rows with fewer than two recorded epochs get φ = 0.
    """
    y = losses.double().clamp_min(1e-12).log()
    m = torch.isfinite(losses).double()
    y = torch.where(m > 0, y, torch.zeros_like(y))
    r = torch.arange(1, losses.shape[1] + 1, dtype=torch.float64).expand_as(y)
    n = m.sum(1)
    sx, sy = (m * r).sum(1), (m * y).sum(1)
    sxx, sxy = (m * r * r).sum(1), (m * r * y).sum(1)
    den = n * sxx - sx * sx
    ok = (n >= 2) & (den > 0)
    slope = torch.where(ok, (n * sxy - sx * sy) / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))
    intercept = torch.where(ok, (sy - slope * sx) / n.clamp_min(1), torch.zeros_like(den))
    log_w = (-slope).clamp_min(0.0)
    phi = intercept.exp() * (1.0 - torch.exp(-horizon * log_w))
    return torch.where(ok, phi, torch.zeros_like(phi))


class MRMCStrategy(Strategy):
    """MRMC / MRMC-R (ICML 2025): a static core-set of the samples whose loss falls most.

    Training-side reports during the first `warmup_epochs` epochs (0-based
    `Progress.epoch` < warmup_epochs, full-data training) record each sample's
    loss once per epoch (a later report in the same epoch overwrites): points
    r = 1..R. These are training-mode losses (batch norm with batch statistics,
    dropout on). The selection's own scoring pass, made with the model as it is
    after warm-up, can add the end-of-warm-up loss as point r = R + 1, so that
    one warm-up epoch gives two points; but that point is an eval-mode loss,
    which for batch-norm or dropout models is measured differently from the
    others. `scoring_point=auto` (default) adds it only when the warm-up has a
    single epoch (it is then the only second point); `on` always adds it; `off`
    never does (and needs warmup_epochs >= 2). Each sample's curve is fitted as
    ℓ^(r) ≈ q·w^−r and scored φ = q(1 − w^−H), H = the number of points.
    Samples with fewer than two points get φ = 0.

    Balance (MRMC-R, `rho` < 1): the top ⌈rho·k⌉ by φ are taken; a softmax
    linear probe is fitted on their penultimate features (standardised,
    L-BFGS from zero, L2 1e-3, so deterministic); the rest are ranked by
    φ − gamma·p'_y and fill the remaining places. `rho=1` is plain MRMC.
    Policies other than topk are applied to φ directly, without balance.

    A warm-up that would fill the run is cut to half the run with a warning;
    a run too short for one warm-up epoch and one core-set epoch is refused
    (`plan`).
    """

    name = "mrmc"
    description = ("Static core-set of the samples whose warm-up loss falls most, balanced by a linear probe "
                   "(MRMC-R, “Maximum Reduction as Maximum Contribution”, ICML 2025).")
    default_mode = "subset"
    default_policy = "topk"
    signals = frozenset({"features", "loss"})
    uses_reports = True
    static = True
    options = {
        "warmup_epochs": Option(int, 10, "full-data epochs whose training losses are fitted (R)", min=1,
                                max=MAX_MRMC_WARMUP),
        "scoring_point": Option(str, "auto", "add the selection's scoring-pass loss (eval mode) as the last point of "
                                "each curve: on, off (training-mode losses only; needs warmup_epochs >= 2), or auto "
                                "(only with a 1-epoch warm-up)", choices=("auto", "on", "off")),
        "rho": Option(float, 0.3, "fraction of the budget taken by φ alone (1 = plain MRMC)", min=0.0, max=1.0),
        "gamma": Option(float, 2.0, "penalty on the linear probe's true-class probability", min=0.0, max=1000.0),
    }

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        if self.opts["scoring_point"] == "off" and self.opts["warmup_epochs"] < 2:
            raise InvalidArgument("strategy 'mrmc': scoring_point=off fits the warm-up's training losses alone, "
                                  f"which needs warmup_epochs >= 2 (got {self.opts['warmup_epochs']})")
        self.table = IdTable({"loss": ((self.opts["warmup_epochs"],), math.nan)})
        self.first_epoch: int | None = None

    @classmethod
    def plan(cls, options, run: RunPlan):
        points = 2 if options.get("scoring_point") == "off" else 1
        return fit_warmup(cls.name, options, run, minimum=points, integer=True,
                          needs="it fits each sample's loss curve to its full-data warm-up epochs"
                                + (", at least 2 with scoring_point=off" if points == 2 else ""))

    def on_report(self, report: Report) -> None:
        ids, losses, progress = report.ids, report.losses, report.progress
        if self.first_epoch is None:
            self.first_epoch = progress.epoch
        col = progress.epoch - self.first_epoch
        if not 0 <= col < self.opts["warmup_epochs"]:
            return
        rows = self.table.rows(ids)
        self.table.data["loss"][rows, col] = losses.double()

    @property
    def uses_scoring_point(self) -> bool:
        """True when the scoring pass's loss is the curves' last point (see `scoring_point`)."""
        mode = self.opts["scoring_point"]
        return mode == "on" or (mode == "auto" and self.opts["warmup_epochs"] == 1)

    def reduction(self, ids: torch.Tensor, current_loss: torch.Tensor | None = None) -> torch.Tensor:
        """φ for `ids`; `current_loss` (the scoring pass after warm-up) is the last point when given."""
        curves, _ = self.table.gather("loss", ids)
        if current_loss is not None:
            curves = torch.cat([curves.double(), current_loss.double().reshape(-1, 1)], dim=1)
        return fit_reduction(curves, curves.shape[1])

    def select(self, pool: Pool, budget: int, policy: str) -> Selection:
        phi = self.reduction(pool.ids, pool.signals.get("loss") if self.uses_scoring_point else None).float()
        if policy != "topk":
            return apply_policy(policy, phi, pool.labels, budget, self.context.generator)
        first = min(budget, math.ceil(self.opts["rho"] * budget))
        head = topk(phi, first).indices
        if first == budget:
            return Selection(indices=head, scores=phi)
        rest = torch.ones(len(pool), dtype=torch.bool)
        rest[head] = False
        rest_idx = torch.nonzero(rest, as_tuple=True)[0]
        p_true = self._probe_true_prob(pool.signals["features"], pool.labels, head, rest_idx)
        combined = phi[rest_idx].double() - self.opts["gamma"] * p_true
        tail = rest_idx[topk(combined, budget - first).indices]
        return Selection(indices=torch.cat([head, tail]), scores=phi)

    def _probe_true_prob(self, feats, labels, head, rest_idx) -> torch.Tensor:
        h = feats.double()
        mu, sd = h[head].mean(0), h[head].std(0, unbiased=False).clamp_min(1e-6)
        h = (h - mu) / sd
        c = max(self.context.num_classes, int(labels.max()) + 1)
        w = torch.zeros(h.shape[1], c, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(c, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=50, line_search_fn="strong_wolfe")
        xa, ya = h[head], labels[head]

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(xa @ w + b, ya) + 1e-3 * w.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        with torch.no_grad():
            p = (h[rest_idx] @ w + b).softmax(1)
            return p[torch.arange(rest_idx.numel()), labels[rest_idx]]
