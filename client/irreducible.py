"""Training RHO-LOSS's irreducible-loss model on the trainer's side, before the first selection.

A strategy that asks for the signal `irreducible_loss` says how through `Strategy.irreducible_training`:
the share of training ids held out (`dataselect.holdout.HoldOut`, seeded by the session's seed), and the
epochs and AdamW settings. The model is a freshly initialised copy of the one being trained: a registered
model is built again from its name; any other module is deep-copied and every submodule with a
`reset_parameters` method re-initialised. The time this takes is a selection cost.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dataselect.errors import InvalidArgument
from dataselect.holdout import HoldOut
from dataselect.models import build_model
from dataselect.strategy import IrreducibleTraining


def fresh_copy(model: nn.Module, registered: tuple[str, dict] | None, seed: int) -> nn.Module:
    """A newly initialised model of the same architecture (seeded: the same weights every run)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if registered is not None:
            fresh = build_model(registered[0], **dict(registered[1]))
        else:
            fresh = copy.deepcopy(model)
            reset = [m for m in fresh.modules() if callable(getattr(m, "reset_parameters", None))]
            if not reset:
                raise InvalidArgument(
                    f"cannot re-initialise a {type(model).__name__} for the irreducible-loss model: none of its "
                    "modules has reset_parameters(); build the model with dataselect.models.build_model, or give "
                    "its layers reset_parameters()")
            for m in reset:
                m.reset_parameters()
    return fresh


def held_out_positions(data: Any, share: float, seed: int) -> torch.Tensor:
    """Positions in `data` whose ids the seeded share holds out."""
    ids = getattr(data, "ids", None)
    if ids is None:
        ids = torch.arange(len(data))
    return torch.nonzero(HoldOut(share, seed)(ids), as_tuple=True)[0]


def train_irreducible(model: nn.Module, data: Any, positions: torch.Tensor, plan: IrreducibleTraining, *,
                      batch_size: int, seed: int, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """Train `model` (a fresh copy) on the samples at `positions` of `data` (the loader's data: `batches`
    yields (positions, inputs, labels, ids)); returns its CPU state dict and figures about the training (its time is counted by the caller)."""
    if positions.numel() == 0:
        raise InvalidArgument(f"the irreducible-loss model has no samples to train on: a holdout share of "
                              f"{plan.share:g} of {len(data)} samples holds none; raise -o holdout")
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay)
    shuffle = torch.Generator().manual_seed(seed)
    last = float("nan")
    for _ in range(plan.epochs):
        order = positions[torch.randperm(positions.numel(), generator=shuffle)]
        parts = [order[i:i + batch_size] for i in range(0, order.numel(), batch_size)]
        total, seen = 0.0, 0
        for _, x, y, _ in data.batches(parts, inputs=True):
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * y.numel()
            seen += y.numel()
        last = total / max(1, seen)
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return state, {"irreducible_holdout_samples": int(positions.numel()), "irreducible_epochs": plan.epochs,
                   "irreducible_final_train_loss": last}
