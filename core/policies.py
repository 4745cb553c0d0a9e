"""Selection policies shared by every strategy: turn scores into a selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dataselect.errors import InvalidArgument
# The names live in dataselect.names (one spelling for the command lines, the engine and the plugins);
# VARIABLE_SIZE_POLICIES keep 0..budget samples whatever the strategy declares.
from dataselect.names import POLICIES, VARIABLE_SIZE_POLICIES

__all__ = ["POLICIES", "VARIABLE_SIZE_POLICIES", "Selection", "apply_policy", "class_balanced", "sample", "threshold",
           "topk"]


@dataclass
class Selection:
    """Positions into the pool to train on, with optional loss weights."""

    indices: torch.Tensor  # int64 [k]
    weights: torch.Tensor | None = None  # float32 [k]
    scores: torch.Tensor | None = None  # float32 [n], whole pool
    #: Optional figures about this selection for the trainer's metrics (JSON scalars by name).
    diagnostics: dict[str, Any] | None = None


def topk(scores: torch.Tensor, budget: int) -> Selection:
    """The `budget` highest scores (ties broken by pool order)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return Selection(indices=order[:budget].clone())


def class_balanced(scores: torch.Tensor, labels: torch.Tensor, budget: int) -> Selection:
    """Top-k within each class, quotas proportional to the pool's class counts.

    Quotas use largest remainders so they sum to exactly `budget`.
    """
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * budget / labels.numel()
    quota = exact.floor().long()
    remainder = budget - int(quota.sum())
    if remainder > 0:
        extra = torch.argsort(exact - quota.double(), descending=True, stable=True)[:remainder]
        quota[extra] += 1
    chosen = []
    for cls, q in zip(classes.tolist(), quota.tolist()):
        if q == 0:
            continue
        members = torch.nonzero(labels == cls, as_tuple=True)[0]
        order = torch.argsort(scores[members], descending=True, stable=True)
        chosen.append(members[order[:q]])
    return Selection(indices=torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.long))


def sample(scores: torch.Tensor, budget: int, generator: torch.Generator) -> Selection:
    """Draw without replacement with probability proportional to score.

    Scores are shifted to be non-negative; a tiny floor keeps every sample
    reachable. Weights `1 / (n * q_i)` (normalised to mean 1) correct the bias of
    the draw when applied to the loss.
    """
    s = scores.double()
    s = s - min(0.0, float(s.min()))
    s = s + max(float(s.sum()) * 1e-8, 1e-12)
    q = s / s.sum()
    idx = torch.multinomial(q, budget, replacement=False, generator=generator)
    w = 1.0 / (q[idx] * q.numel())
    w = (w / w.mean()).float()
    return Selection(indices=idx, weights=w)


def threshold(scores: torch.Tensor, budget: int, value: float | None = None) -> Selection:
    """Samples whose score is at least `value` (default: the pool mean), at most `budget`, best first.

    Variable-size (0..budget): the session accepts fewer than `budget` for this policy with any strategy."""
    cut = float(scores.float().mean()) if value is None else value
    above = torch.nonzero(scores >= cut, as_tuple=True)[0]
    order = torch.argsort(scores[above], descending=True, stable=True)
    return Selection(indices=above[order[:budget]])


def apply_policy(
    policy: str,
    scores: torch.Tensor,
    labels: torch.Tensor,
    budget: int,
    generator: torch.Generator,
) -> Selection:
    """Apply a policy by name; the scores are returned with the selection."""
    scores = scores.detach().float().cpu()
    if policy == "topk":
        sel = topk(scores, budget)
    elif policy == "class_balanced":
        sel = class_balanced(scores, labels, budget)
    elif policy == "sample":
        sel = sample(scores, budget, generator)
    elif policy == "threshold":
        sel = threshold(scores, budget)
    else:
        raise InvalidArgument(f"unknown policy {policy!r}; use one of: {', '.join(POLICIES)}")
    sel.scores = scores
    return sel
