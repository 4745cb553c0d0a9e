"""EL2N and forgetting-events scores as dataselect selection strategies.

* `el2n` (Paul et al., "Deep Learning on a Data Diet", NeurIPS 2021): the
  L2 norm of the error vector, ‖p_i − e_{y_i}‖₂, where p_i is the model's
  softmax output for sample i and e_{y_i} the one-hot label. Large = hard or
  mislabelled; top-k keeps the hardest.
* `forgetting` (Toneva et al., "An Empirical Study of Example Forgetting",
  ICLR 2019): the number of times a sample went from classified correctly
  to incorrectly between two consecutive training reports. Samples never
  learned yet (never reported, or never correct) count as the most
  forgettable. Needs no scoring pass: it learns from the trainer's reports.
"""

from __future__ import annotations

import torch

import dataselect
from dataselect.plugins.base import Option, Pool, Report, Strategy

__version__ = "0.1.0"


class EL2NSelector(Strategy):
    """Largest error-vector norm ‖softmax(f(x_i)) − onehot(y_i)‖₂ first (Paul et al. 2021)."""

    name = "el2n"
    description = "Largest EL2N score ||p - onehot(y)||_2 first (Paul et al. 2021, 'Data Diet')."
    default_mode = "online"
    default_policy = "topk"
    signals = frozenset({"probs"})
    options = {
        "easiest": Option(bool, False, "prefer the smallest scores (keep easy samples) instead of the hardest"),
    }

    def score(self, pool: Pool) -> torch.Tensor:
        probs = pool.signals["probs"].float()
        onehot = torch.nn.functional.one_hot(pool.labels, probs.shape[1]).to(probs.dtype)
        el2n = torch.linalg.vector_norm(probs - onehot, dim=1)
        return -el2n if self.opts["easiest"] else el2n


#: Score of a sample never learned (Toneva et al. count it as forgotten
#: infinitely often; scores must be finite, so it is a large finite number).
NEVER_LEARNED = 1e6


class ForgettingSelector(Strategy):
    """Most forgetting events first (Toneva et al. 2019), from the trainer's reports.

    Each report says, per sample just trained on, whether the model classified
    it correctly (`correct`; when absent, p_{i,y_i} > 0.5 is used, which
    implies a correct argmax). A forgetting event is correct at the previous
    report and incorrect at this one. Score = number of events; samples never
    learned score NEVER_LEARNED. Ties (many samples have 0 events) are broken
    by a seeded random draw, so equal scores do not favour pool order.
    """

    name = "forgetting"
    description = "Most forgetting events (learned -> forgotten) first, from training reports (Toneva et al. 2019)."
    default_mode = "online"
    default_policy = "topk"
    signals = frozenset()
    uses_reports = True

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.last_correct: dict[int, bool] = {}
        self.ever_correct: set[int] = set()
        self.forgets: dict[int, int] = {}

    def on_report(self, report: Report) -> None:
        ids, losses, true_class_probs, correct = report.ids, report.losses, report.true_class_probs, report.correct
        if correct is None:
            p = true_class_probs if true_class_probs is not None else torch.exp(-losses)
            correct = p > 0.5
        for i, ok in zip(ids.tolist(), correct.tolist()):
            if self.last_correct.get(i) and not ok:
                self.forgets[i] = self.forgets.get(i, 0) + 1
            self.last_correct[i] = bool(ok)
            if ok:
                self.ever_correct.add(i)

    def score(self, pool: Pool) -> torch.Tensor:
        counts = [float(self.forgets.get(i, 0)) if i in self.ever_correct else NEVER_LEARNED
                  for i in pool.ids.tolist()]
        scores = torch.tensor(counts, dtype=torch.float64)
        # Tie-break within equal counts: jitter in [0, 0.5) keeps the order of distinct counts.
        jitter = torch.rand(len(pool), generator=self.context.generator, dtype=torch.float64) * 0.5
        return (scores + jitter).float()


@dataselect.hookimpl
def register_strategies(register):
    register(EL2NSelector)
    register(ForgettingSelector)
