"""Strategies driven by training-side statistics: importance sampling, Selective Backprop, InfoBatch.

These keep a variable number of samples or draw with replacement, so they
declare `exact_budget = False` or `with_replacement = True` (see
`plugins.base.Strategy`). They choose samples by their own rule; the request's
policy is not used. Selective Backprop and InfoBatch are `self_sized`: the
trainer asks them with the whole pool as the budget and trains on whatever
their rule keeps (0..pool), as their authors' code does.
"""

from __future__ import annotations

import math
import warnings
from collections import deque

import torch

from dataselect.plugins.strategies.state import IdTable
from dataselect.plugins.strategies.warmup import fit_warmup
from dataselect.strategy import Option, Pool, Progress, Report, RunPlan, Selection, Strategy

#: Upper bound of every `warmup_epochs` option: more full-data epochs than any run has.
MAX_WARMUP_EPOCHS = 1000


def _uniform_subset(kept: torch.Tensor, budget: int, generator: torch.Generator) -> torch.Tensor:
    """At most `budget` of `kept`, drawn uniformly and returned in pool order.

    Only a caller that asks a self-sized strategy with less than the whole pool
    gets here; a uniform draw keeps the strategy's own rule (and any rescaling)
    unbiased, where a cut by score would turn it into top-k."""
    if kept.numel() <= budget:
        return kept
    return kept[torch.randperm(kept.numel(), generator=generator)[:budget]].sort().values


class ImportanceSamplingStrategy(Strategy):
    """Importance sampling after Quercia et al. (ICDM 2023): SGD biased towards the samples found important early.

    Importance w_i = 1 − p_{i,y_i} from the training-side reports (p_{i,y_i},
    or exp(−loss) when absent: for cross-entropy they are equal), smoothed over
    epochs: the first report sets w, later ones w ← momentum·w + (1 − momentum)·(1 − p).
    The trainer reports each sample once per epoch it is trained on. Samples
    never reported have w = 1 (maximal importance), so they are not starved.

    `estimate=once` (default: the paper's method, which computes the estimates
    once, after a few epochs of normal training, and samples by them for the rest
    of training): reports update w until the first selection that draws by
    importance with at least one report to go on; w is then frozen and later
    reports are ignored. `estimate=running`: every report keeps updating w. Only
    drawn samples are trained on and reported, so the others keep their last
    value; the distribution then follows what was drawn.

    During warm-up (0-based epoch < warmup_epochs; the trainer trains these
    epochs on full data) the selection is a uniform draw without replacement.
    Afterwards `budget` draws with replacement ∝ w_i + ε; the trainer trains on
    every occurrence. Weights are always returned: 1, or with `reweight`
    1/(N·q_i) (an unbiased gradient).
    """

    name = "importance_sampling"
    description = ("Draw with replacement by the importance 1 - p_true learnt from training reports during "
                   "warm-up (Quercia et al., ICDM 2023).")
    default_mode = "weighted"
    default_policy = "topk"
    signals = frozenset()
    uses_reports = True
    with_replacement = True
    options = {
        "warmup_epochs": Option(int, 2, "epochs of normal (full-data) training whose reports estimate the importance",
                                min=0, max=MAX_WARMUP_EPOCHS),
        "estimate": Option(str, "once", "once: estimate the importance after warm-up and keep it (the paper); "
                           "running: keep updating it from every report", choices=("once", "running")),
        "momentum": Option(float, 0.9, "EMA momentum of the importance over epochs", min=0.0, max=1.0),
        "epsilon": Option(float, 0.01, "added to every importance (in [0, 1]) so every sample stays reachable",
                          min=0.0, max=100.0),
        "reweight": Option(bool, False, "weight each drawn sample's loss by 1/(N·q_i) (unbiased)"),
    }

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.table = IdTable({"w": ((), 1.0)})
        self.seen: set[int] = set()
        #: True once `estimate=once` has taken its estimate: reports are then ignored.
        self.frozen = False

    @classmethod
    def plan(cls, options, run: RunPlan):
        return fit_warmup(cls.name, options, run, minimum=1, integer=True,
                          needs="it estimates each sample's importance from full-data training first")

    def on_report(self, report: Report) -> None:
        if self.frozen:
            return
        ids, losses, true_class_probs = report.ids, report.losses, report.true_class_probs
        p = true_class_probs if true_class_probs is not None else torch.exp(-losses)
        new = 1.0 - p.double().clamp(0.0, 1.0)
        fresh = torch.tensor([i not in self.seen for i in ids.tolist()], dtype=torch.bool)
        rows = self.table.rows(ids)
        m = self.opts["momentum"]
        w = self.table.data["w"]
        w[rows] = torch.where(fresh, new, m * w[rows] + (1.0 - m) * new)
        self.seen.update(ids.tolist())

    def probabilities(self, ids: torch.Tensor) -> torch.Tensor:
        w, _ = self.table.gather("w", ids)
        s = w + self.opts["epsilon"]
        if float(s.sum()) <= 0:  # every w = 0 and epsilon = 0: nothing to prefer
            s = torch.ones_like(s)
        return s / s.sum()

    def select(self, pool: Pool, budget: int, policy: str) -> Selection:
        n = len(pool)
        if pool.progress.epoch < self.opts["warmup_epochs"]:
            idx = torch.randperm(n, generator=self.context.generator)[:budget]
            return Selection(indices=idx, weights=torch.ones(budget))
        if self.opts["estimate"] == "once" and self.seen:
            self.frozen = True
        q = self.probabilities(pool.ids)
        idx = torch.multinomial(q, budget, replacement=True, generator=self.context.generator)
        weights = (1.0 / (n * q[idx])).float() if self.opts["reweight"] else torch.ones(budget)
        return Selection(indices=idx, weights=weights, scores=q.float())


class SelectiveBackpropStrategy(Strategy):
    """Selective Backprop (Jiang et al., arXiv 2019): keep each candidate with probability F(ℓ_i)^β.

    ℓ_i is the loss of the scoring pass over the pool (eval mode, as in the
    authors' forward pass). F(ℓ) is the share of the last `history` losses that
    are strictly below ℓ; each pool's losses join the history before F is
    computed (as in the authors' code), so the first pool is judged against
    itself and its own largest loss has F = (h − 1)/h. Expected kept fraction
    for stationary losses: about 1/(β + 1). β = 0 keeps every candidate.

    Self-sized (`self_sized`): the trainer asks with the whole pool as the budget
    and trains on every kept sample, 0..pool (an empty selection is allowed: the
    trainer fills its batches from the next pools). A caller that passes a
    smaller budget gets a uniform draw of that many kept samples.

    Priming: `warmup_epochs` (default 1, as the authors' code trains the whole
    first epoch on every sample before selecting) full-data epochs first; in
    online mode a fraction of an epoch (0.5) is allowed. A priming that would
    fill the run is cut to half the run with a warning (`plan`).
    """

    name = "selective_backprop"
    description = ("Keep each candidate with probability percentile(loss)^beta after one epoch of priming "
                   "(Selective Backprop, Jiang et al., arXiv 2019).")
    default_mode = "online"
    default_policy = "topk"
    signals = frozenset({"loss"})
    exact_budget = False
    self_sized = True
    options = {
        "beta": Option(float, 3.0, "selectivity: kept fraction ≈ 1/(beta+1)", min=0.0, max=100.0),
        "history": Option(int, 1024, "number of recent losses the percentile is taken over", min=1, max=100_000),
        "warmup_epochs": Option(float, 1.0, "priming: full-data epochs before selecting (online mode: fractions "
                                "allowed)", min=0.0, max=float(MAX_WARMUP_EPOCHS)),
    }

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.history: deque[float] = deque(maxlen=self.opts["history"])

    @classmethod
    def plan(cls, options, run: RunPlan):
        return fit_warmup(cls.name, options, run, needs="priming")

    def keep_probabilities(self, loss: torch.Tensor) -> torch.Tensor:
        """F(ℓ)^β for a pool's losses, after they join the history."""
        loss = loss.double()
        self.history.extend(loss.tolist())
        hist = torch.tensor(list(self.history), dtype=torch.float64).sort().values
        below = torch.searchsorted(hist, loss, right=False)  # count of history losses < ℓ
        return (below.double() / hist.numel()).pow(self.opts["beta"])

    def select(self, pool: Pool, budget: int, policy: str) -> Selection:
        keep_p = self.keep_probabilities(pool.signals["loss"])
        draw = torch.rand(keep_p.numel(), generator=self.context.generator, dtype=torch.float64)
        kept = torch.nonzero(draw < keep_p, as_tuple=True)[0]
        kept = _uniform_subset(kept, budget, self.context.generator)
        return Selection(indices=kept, scores=keep_p.float())


class InfoBatchStrategy(Strategy):
    """InfoBatch (Qin et al., ICLR 2024): prune a random part of the well-learned samples, rescale the rest.

    Scores are each sample's latest reported training loss (samples pruned from
    an epoch keep their older score). In each pruned epoch a uniform draw of
    ⌊(1 − r)·|L|⌋ of the well-learned samples L = {reported, score < the mean of
    every score reported so far} is kept with loss weight 1/(1 − r), r =
    `prune_ratio`; the rest of L is pruned, and every other sample is kept with
    weight 1. As in the
    authors' code, epoch e (0-based) of E prunes while e + 1 ≤ anneal·E (the
    first ⌊anneal·E⌋ epochs; Progress.fraction < anneal when the total is
    unknown); the remaining epochs train on everything with weight 1.

    Samples never reported are never pruned and do not enter the mean (the
    authors start every score at 3, which prunes nothing in the first epoch
    either, but would count as well-learned for a loss scale above 3).
    `prune_ratio` is at most 0.9 (weights up to 10), the authors' clamp.

    Self-sized (`self_sized`): the trainer asks with the whole pool as the budget
    and trains on everything kept; --select-fraction does not cap it. A caller
    that passes a smaller budget gets a uniform draw of that many kept samples
    (which keeps the rescaling unbiased). Positions come back in pool order.
    """

    name = "infobatch"
    description = ("Prune a random share of the below-mean-loss samples, up-weight the rest of them, train on "
                   "everything else (InfoBatch, Qin et al., ICLR 2024).")
    default_mode = "subset"
    default_policy = "topk"
    signals = frozenset()
    uses_reports = True
    exact_budget = False
    self_sized = True
    options = {
        "prune_ratio": Option(float, 0.5, "share r of the below-mean-loss samples pruned each epoch (at most 0.9, "
                              "the authors' clamp: kept ones weigh 1/(1-r))", min=0.0, max=0.9),
        "anneal": Option(float, 0.875, "prune during the first anneal·epochs epochs, then train on everything",
                         min=0.0, max=1.0),
    }

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.table = IdTable({"loss": ((), math.inf)})

    @classmethod
    def plan(cls, options, run: RunPlan):
        """Warn when no epoch can prune: the first has no losses yet, and epoch e prunes only while e + 1 <= anneal·E."""
        pruned = math.floor(options["anneal"] * run.epochs + 1e-9) - 1  # epochs 1 .. floor(anneal·E) - 1
        if run.epochs >= 1 and options["prune_ratio"] > 0 and pruned < 1:
            least = math.ceil(2 / options["anneal"] - 1e-9) if options["anneal"] > 0 else None
            advice = f"use --epochs {least} or more" if least else "raise anneal above 0"
            warnings.warn(
                f"strategy 'infobatch' prunes from the second epoch on, while epoch + 1 <= anneal·epochs "
                f"(anneal={options['anneal']:g}); a {run.epochs}-epoch run prunes nothing and trains on all the data: "
                f"{advice} (or raise -o anneal).", stacklevel=2)
        return options

    def on_report(self, report: Report) -> None:
        rows = self.table.rows(report.ids)  # first: it may grow (replace) the tensors
        self.table.data["loss"][rows] = report.losses.double()

    def pruning(self, progress: Progress) -> bool:
        """True while the epoch of `progress` is one of the pruned ones."""
        if progress.total_epochs > 0:
            return progress.epoch + 1 <= self.opts["anneal"] * progress.total_epochs + 1e-9
        return progress.fraction < self.opts["anneal"]

    def reported_mean(self) -> float:
        return float(self.table.data["loss"][:len(self.table)].mean())

    def select(self, pool: Pool, budget: int, policy: str) -> Selection:
        n = len(pool)
        r = self.opts["prune_ratio"]
        score, seen = self.table.gather("loss", pool.ids)
        weights = torch.ones(n)
        keep = torch.ones(n, dtype=torch.bool)
        if r > 0 and bool(seen.any()) and self.pruning(pool.progress):
            low = torch.nonzero(seen & (score < self.reported_mean()), as_tuple=True)[0]
            n_keep = math.floor((1.0 - r) * low.numel() + 1e-9)  # 1e-9: (1 - 0.9) * 10 is 0.99999...
            order = torch.randperm(low.numel(), generator=self.context.generator)
            keep[low[order[n_keep:]]] = False
            weights[low] = 1.0 / (1.0 - r)
        kept = _uniform_subset(torch.nonzero(keep, as_tuple=True)[0], budget, self.context.generator)
        finite = torch.where(seen, score, torch.full_like(score, torch.finfo(torch.float32).max)).float()
        return Selection(indices=kept, weights=weights[kept], scores=finite)
