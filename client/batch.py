"""What a session hands out: a Select's choice (`Chosen`), one training step's samples (`Batch`) and a
Select in flight (`Pending`). `dataselect.client.session` re-exports them; the loaders import them from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dataselect.client.scorer import ScoreReply
from dataselect.strategy import Progress


@dataclass
class Chosen:
    """What a Select chose from a candidate pool: `rows` index the pool as given."""

    rows: torch.Tensor  # int64 [k]; repeats when the strategy draws with replacement
    ids: torch.Tensor  # int64 [k]
    weights: torch.Tensor | None  # float32 [k] loss multipliers, or None (all 1)


class Batch(tuple):
    """One training step's samples: unpacks as `(inputs, targets)`, and carries `ids` (data set
    indices), `weights` (loss multipliers, or None) and `progress` (for the reports)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor | None
    progress: Progress

    def __new__(cls, inputs, targets, ids, weights=None, progress=None):
        self = super().__new__(cls, (inputs, targets))
        self.inputs, self.targets, self.ids, self.weights = inputs, targets, ids, weights
        self.progress = progress or Progress()
        return self

    def __reduce__(self):  # a tuple subclass with attributes: keep them when pickled
        return (Batch, (self.inputs, self.targets, self.ids, self.weights, self.progress))


@dataclass
class Pending:
    """A Select that was asked for; `Session.wait` returns its `Chosen`."""

    ids: torch.Tensor
    budget: int
    #: The share of the pool to keep at least (the ramp's, for self-sized strategies); 0: no floor.
    keep: float = 0.0
    reply: ScoreReply | None = None
    future: Any = None
    seconds: float = 0.0
