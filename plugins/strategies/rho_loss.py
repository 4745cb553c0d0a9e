"""RHO-LOSS (Mindermann et al., ICML 2022): train on the points whose loss is high and learnable."""

from __future__ import annotations

import torch

from dataselect.holdout import HoldOut, warn_if_fraction_reaches
from dataselect.strategy import IrreducibleTraining, Option, Pool, RunPlan, Strategy


class RhoLossStrategy(Strategy):
    """Reducible holdout loss: the training loss minus the irreducible loss, largest first.

    Mindermann et al. (ICML 2022) select, from each large candidate batch, the
    points with the highest *reducible holdout loss* L(y|x; θ_t) − L(y|x; θ_IL):
    the current model's loss minus the loss under an *irreducible-loss model*
    trained on a holdout set. A point that is noisy or ambiguous has a high loss
    under both models and a small difference, so it is not chased the way plain
    high-loss selection chases it; a point already learnt has a small loss under
    both; a point that is learnable but not yet learnt stands out.

    How it runs here. A fixed share `holdout` (default 0.1) of the training ids
    is held out by the seeded hash rule of `dataselect.holdout` (the same rule
    as GLISTER's validation share, so trainer, server, replicas and ranks agree
    without exchanging lists). Before the first selection the trainer trains a
    freshly initialised copy of the model on the held-out samples for
    `il_epochs` epochs (AdamW, `il_lr`, weight decay 0.01) and pushes it to the
    scorer as a second checkpoint; that time is a selection cost. The scorer
    computes each sample's loss under it once, when the sample's id first
    appears in a pool, and caches it (the paper precomputes the same losses for
    the whole training set). Held-out samples are never selected while other
    candidates remain: they score below every other candidate. The paper's
    reference implementation computes the target model's loss in eval mode, as
    the scoring pass does here. Its holdout is a separate split; here it is
    taken from the training set, so about `holdout` of it is never trained on,
    and under label noise the holdout is as noisy as the rest.

    Mode `online` (the paper's setting: each pool is a candidate batch of
    batch/--select-fraction samples), policy `topk`.
    """

    name = "rho_loss"
    description = ("RHO-LOSS: largest reducible holdout loss first, training loss minus the loss under a model "
                   "trained on a held-out share of the training ids (Mindermann et al., ICML 2022).")
    default_mode = "online"
    default_policy = "topk"
    signals = frozenset({"loss", "irreducible_loss"})
    options = {
        "holdout": Option(float, 0.1, "share of the training ids held out to train the irreducible-loss model "
                          "(never selected)", min=0.01, max=0.5),
        "il_epochs": Option(int, 5, "epochs the irreducible-loss model trains on the holdout", min=1, max=1000),
        "il_lr": Option(float, 1e-3, "AdamW learning rate of the irreducible-loss model", min=1e-7, max=10.0),
    }

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.held_out = HoldOut(self.opts["holdout"], self.context.seed)

    @classmethod
    def irreducible_training(cls, options):
        return IrreducibleTraining(share=options["holdout"], epochs=options["il_epochs"], lr=options["il_lr"])

    @classmethod
    def plan(cls, options, run: RunPlan):
        warn_if_fraction_reaches(cls.name, "holdout", options["holdout"], run.mode, run.select_fraction)
        return options

    def score(self, pool: Pool) -> torch.Tensor:
        reducible = pool.signals["loss"].float() - pool.signals["irreducible_loss"].float()
        held = self.held_out(pool.ids)
        if bool(held.any()):
            floor = float(reducible[~held].min()) if bool((~held).any()) else 0.0
            reducible = torch.where(held, torch.full_like(reducible, floor - 1.0), reducible)
        return reducible
