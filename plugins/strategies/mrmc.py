"""MRMC (seed 001): maximum loss reduction as maximum contribution."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dataselect.plugins.base import Option, Pool, Progress, Selection, Selector
from dataselect.plugins.policies import apply_policy, topk
from dataselect.plugins.strategies.state import IdTable


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


class MRMCSelector(Selector):
    """MRMC / MRMC-R (seed 001): static core-set of the samples whose loss falls most.

    Training-side reports during the first `warmup_epochs` epochs (0-based
    `Progress.epoch` < warmup_epochs, full-data training) record each sample's
    loss once per epoch (a later report in the same epoch overwrites): points
    r = 1..R. The selection's own scoring pass, made with the model as it is
    after warm-up, adds the end-of-warm-up loss as point r = R + 1 (the
    "scoring pass at epoch end" of STRATEGIES.md), so one warm-up epoch
    already gives two points. Each sample's curve is fitted as
    ℓ^(r) ≈ q·w^−r and scored φ = q(1 − w^−H), H = the number of points
    (R + 1 with the scoring pass). Samples with fewer than two points get φ = 0.

    Balance (MRMC-R, `rho` < 1): the top ⌈rho·k⌉ by φ are taken; a softmax
    linear proxy is fitted on their penultimate features (standardised,
    L-BFGS from zero, L2 1e-3, so deterministic); the rest are ranked by
    φ − gamma·p'_y and fill the remaining places. `rho=1` is plain MRMC.
    Policies other than topk are applied to φ directly, without balance.
    """

    name = "mrmc"
    description = "Maximum loss reduction as maximum contribution, balanced by a linear proxy (MRMC-R, seed 001)."
    default_mode = "subset"
    default_policy = "topk"
    signals = frozenset({"features", "loss"})
    uses_reports = True
    static = True
    options = {
        "warmup_epochs": Option(int, 10, "full-data epochs whose losses are fitted (R); the selection's scoring pass adds one more point", min=1),
        "rho": Option(float, 0.3, "fraction of the budget taken by φ alone (1 = plain MRMC)", min=0.0, max=1.0),
        "gamma": Option(float, 2.0, "penalty on the proxy's true-class probability", min=0.0),
    }

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.table = IdTable({"loss": ((self.opts["warmup_epochs"],), math.nan)})
        self.first_epoch: int | None = None

    def on_report(self, ids, losses, true_class_probs, correct, progress: Progress) -> None:
        if self.first_epoch is None:
            self.first_epoch = progress.epoch
        col = progress.epoch - self.first_epoch
        if not 0 <= col < self.opts["warmup_epochs"]:
            return
        rows = self.table.rows(ids)
        self.table.data["loss"][rows, col] = losses.double()

    def reduction(self, ids: torch.Tensor, current_loss: torch.Tensor | None = None) -> torch.Tensor:
        """φ for `ids`; `current_loss` (the scoring pass after warm-up) is the last point when given."""
        curves, _ = self.table.gather("loss", ids)
        if current_loss is not None:
            curves = torch.cat([curves.double(), current_loss.double().reshape(-1, 1)], dim=1)
        return fit_reduction(curves, curves.shape[1])

    def select(self, pool: Pool, budget: int, policy: str) -> Selection:
        phi = self.reduction(pool.ids, pool.signals.get("loss")).float()
        if policy != "topk":
            return apply_policy(policy, phi, pool.labels, budget, self.context.generator)
        first = min(budget, math.ceil(self.opts["rho"] * budget))
        head = topk(phi, first).indices
        if first == budget:
            return Selection(indices=head, scores=phi)
        rest = torch.ones(len(pool), dtype=torch.bool)
        rest[head] = False
        rest_idx = torch.nonzero(rest, as_tuple=True)[0]
        p_true = self._proxy_true_prob(pool.signals["features"], pool.labels, head, rest_idx)
        combined = phi[rest_idx].double() - self.opts["gamma"] * p_true
        tail = rest_idx[topk(combined, budget - first).indices]
        return Selection(indices=torch.cat([head, tail]), scores=phi)

    def _proxy_true_prob(self, feats, labels, head, rest_idx) -> torch.Tensor:
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
