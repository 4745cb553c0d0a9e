"""Strategies driven by training-side statistics: importance sampling, selective backprop, InfoBatch.

These keep a variable number of samples or draw with replacement, so they
declare `exact_budget = False` or `with_replacement = True` (see
`plugins.base.Selector`). They choose samples by their own rule; the request's
policy is not used.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from dataselect.plugins.base import Option, Pool, Progress, Selection, Selector
from dataselect.plugins.strategies.state import IdTable


def _training_fraction(p: Progress) -> float:
    return p.epoch / p.total_epochs if p.total_epochs > 0 else p.fraction


class ImportanceSamplingSelector(Selector):
    """Seed 003: after warm-up, draw with replacement ∝ w_i + ε, w_i = EMA of 1 − p_{i,y_i}.

    Reports supply p_{i,y_i} (or exp(−loss) when absent: for cross-entropy
    they are equal). Each report updates w ← momentum·w + (1 − momentum)·(1 − p);
    the first report sets w directly. The trainer reports each sample once per
    epoch, so this is an EMA over epochs. Samples never reported get w = 1
    (maximal importance), so they are not starved.

    During warm-up (0-based epoch < warmup_epochs) the selection is a uniform
    draw without replacement (normal training). Afterwards `budget` draws with
    replacement; the trainer trains on every occurrence. Weights are always
    returned: 1, or with `reweight` 1/(N·q_i) (unbiased gradient).
    """

    name = "importance_sampling"
    description = "Draw with replacement by EMA of 1 - p_true from training reports (seed 003)."
    default_mode = "weighted"
    default_policy = "topk"
    signals = frozenset()
    uses_reports = True
    with_replacement = True
    options = {
        "warmup_epochs": Option(int, 2, "epochs of normal (uniform) training first", min=0),
        "momentum": Option(float, 0.9, "EMA momentum of the importance over epochs", min=0.0, max=1.0),
        "epsilon": Option(float, 0.01, "added to every importance so every sample stays reachable", min=0.0),
        "reweight": Option(bool, False, "weight each drawn sample's loss by 1/(N·q_i) (unbiased)"),
    }

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.table = IdTable({"w": ((), 1.0)})
        self.seen: set[int] = set()

    def on_report(self, ids, losses, true_class_probs, correct, progress) -> None:
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
        q = self.probabilities(pool.ids)
        idx = torch.multinomial(q, budget, replacement=True, generator=self.context.generator)
        weights = (1.0 / (n * q[idx])).float() if self.opts["reweight"] else torch.ones(budget)
        return Selection(indices=idx, weights=weights, scores=q.float())


class SelectiveBackpropSelector(Selector):
    """Selective backprop (Jiang et al. 2019): keep sample i with probability F(ℓ_i)^β.

    ℓ_i comes from the scoring pass over the pool (the forward SB needs
    anyway). F is the fraction of the last `history` losses that are ≤ ℓ_i;
    each pool's losses join the history before F is computed (as in the
    authors' code), so the first pool is judged against itself. Expected kept
    fraction for stationary losses: 1/(β+1).

    Variable size: between 1 and `budget` (`exact_budget` False). If nothing
    is kept the highest-loss sample is; if more than `budget` are kept, the
    `budget` with the largest F are. The trainer trains on exactly the
    returned samples.
    """

    name = "selective_backprop"
    description = "Keep each sample with probability percentile(loss)^beta (Jiang et al. 2019)."
    default_mode = "online"
    default_policy = "topk"
    signals = frozenset({"loss"})
    exact_budget = False
    options = {
        "beta": Option(float, 3.0, "selectivity: kept fraction ≈ 1/(beta+1)", min=0.0),
        "history": Option(int, 1024, "number of recent losses the percentile is taken over", min=1),
    }

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.history: deque[float] = deque(maxlen=self.opts["history"])

    def select(self, pool: Pool, budget: int, policy: str) -> Selection:
        loss = pool.signals["loss"].double()
        self.history.extend(loss.tolist())
        hist = torch.tensor(list(self.history), dtype=torch.float64).sort().values
        pct = torch.searchsorted(hist, loss, right=True).double() / hist.numel()
        keep_p = pct.pow(self.opts["beta"])
        draw = torch.rand(loss.numel(), generator=self.context.generator, dtype=torch.float64)
        kept = torch.nonzero(draw < keep_p, as_tuple=True)[0]
        if kept.numel() == 0:
            kept = loss.argmax().view(1)
        elif kept.numel() > budget:
            kept = kept[torch.argsort(pct[kept], descending=True, stable=True)[:budget]]
        return Selection(indices=kept, scores=keep_p.float())


class InfoBatchSelector(Selector):
    """InfoBatch (Qin et al., ICLR 2024): prune a random part of the well-learned samples, rescale the rest.

    Scores are each sample's latest reported training loss; samples never
    reported count as "large" (never pruned) and do not enter the mean. While
    the training fraction (epoch/total_epochs, else Progress.fraction) is below
    `anneal`, round(prune_ratio·|L|) samples drawn uniformly from L = {score <
    mean of the pool's reported scores} are pruned, and the kept members of L
    get loss weight 1/(1 − prune_ratio); all others weight 1. From `anneal`
    on, nothing is pruned (weights 1).

    Variable size, 1..budget (`exact_budget` False); the budget is an upper
    bound: if more survive, a uniform subset of `budget` is kept (that keeps
    the rescaling unbiased). Positions come back in pool order.
    """

    name = "infobatch"
    description = "Prune a random part of below-mean-loss samples and rescale the rest (InfoBatch, ICLR 2024)."
    default_mode = "subset"
    default_policy = "topk"
    signals = frozenset()
    uses_reports = True
    exact_budget = False
    options = {
        "prune_ratio": Option(float, 0.5, "fraction r of below-mean samples pruned each epoch", min=0.0, max=0.99),
        "anneal": Option(float, 0.875, "stop pruning from this fraction of training on", min=0.0, max=1.0),
    }

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.table = IdTable({"loss": ((), math.inf)})

    def on_report(self, ids, losses, true_class_probs, correct, progress) -> None:
        rows = self.table.rows(ids)  # first: it may grow (replace) the tensors
        self.table.data["loss"][rows] = losses.double()

    def select(self, pool: Pool, budget: int, policy: str) -> Selection:
        n = len(pool)
        r = self.opts["prune_ratio"]
        score, seen = self.table.gather("loss", pool.ids)
        weights = torch.ones(n)
        keep = torch.ones(n, dtype=torch.bool)
        if _training_fraction(pool.progress) < self.opts["anneal"] and bool(seen.any()) and r > 0:
            low = torch.nonzero(seen & (score < score[seen].mean()), as_tuple=True)[0]
            n_prune = round(r * low.numel())
            pruned = low[torch.randperm(low.numel(), generator=self.context.generator)[:n_prune]]
            keep[pruned] = False
            weights[low] = 1.0 / (1.0 - r)
        kept = torch.nonzero(keep, as_tuple=True)[0]
        if kept.numel() > budget:
            kept = kept[torch.randperm(kept.numel(), generator=self.context.generator)[:budget]].sort().values
        finite = torch.where(seen, score, torch.full_like(score, torch.finfo(torch.float32).max)).float()
        return Selection(indices=kept, weights=weights[kept], scores=finite)
