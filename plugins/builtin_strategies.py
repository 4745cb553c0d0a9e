"""Built-in selection strategies, registered through the same hook a third party uses."""

from __future__ import annotations

import torch

from dataselect.hookspecs import hookimpl
from dataselect.plugins.strategies import STRATEGIES
from dataselect.policies import apply_policy
from dataselect.strategy import Pool, Selection, Strategy


class RandomStrategy(Strategy):
    """Uniform sample without replacement: the baseline. Needs no forward pass."""

    name = "random"
    description = "Uniform random sample without replacement (the baseline; no scoring pass)."
    default_mode = "online"
    default_policy = "topk"
    signals = frozenset()

    def score(self, pool: Pool) -> torch.Tensor:
        # Random scores + top-k is a uniform draw without replacement.
        return torch.rand(len(pool), generator=self.context.generator)

    def select(self, pool: Pool, budget: int, policy: str) -> Selection:
        # Any policy over random scores is still a uniform draw; keep weights at 1.
        return apply_policy("topk" if policy == "sample" else policy, self.score(pool), pool.labels, budget,
                            self.context.generator)


class HighLossStrategy(Strategy):
    """The highest per-sample cross-entropy of the scoring pass (eval mode) first.

    The deterministic top-k form of the "biggest losers" idea of Jiang et al.
    ("Accelerating Deep Learning by Focusing on the Biggest Losers", arXiv 2019);
    `selective_backprop` is their probabilistic rule.
    """

    name = "high_loss"
    description = "Highest per-sample loss first (top-k form of Jiang et al., arXiv 2019)."
    default_mode = "online"
    default_policy = "topk"
    signals = frozenset({"loss"})

    def score(self, pool: Pool) -> torch.Tensor:
        return pool.signals["loss"]


def _builtin_strategies() -> list[type[Strategy]]:
    return [RandomStrategy, HighLossStrategy, *STRATEGIES]


@hookimpl
def register_strategies(register):
    for cls in _builtin_strategies():
        register(cls)
