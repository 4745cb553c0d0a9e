"""Data selection in a PyTorch Lightning `Trainer`: `pip install "dataselect[lightning]"`.

    from dataselect.client.lightning import SelectionCallback

    selection = SelectionCallback("high_loss", model, train_set, batch_size=64)   # server="host:50051" to score remotely

    class Model(L.LightningModule):
        ...
        def training_step(self, batch, batch_idx):
            x, y = selection.take(batch)                   # the samples the strategy chose
            return selection.loss(self(x), y)              # weighted, reported, auxiliary terms added

    trainer = L.Trainer(max_epochs=3, callbacks=[selection])
    trainer.fit(model, train_dataloaders=selection.train_dataloader(num_workers=4))

The callback holds a `dataselect.Session` on the LightningModule. Its
DataLoader's batch sampler runs the strategy's mode: online pools are scored
inside `take`, at the step that trains on them, with the current weights (so
Lightning's batch prefetching never makes a selection stale); subset and
weighted selections happen when an epoch begins. After each optimiser step the
callback counts the step (pushing the model to the scorer every `sync_every`
steps); at the end of fitting it closes the session. `selection.session.costs`
holds the selection costs.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("dataselect's Lightning callback needs Lightning: pip install \"dataselect[lightning]\"") from exc

from dataselect.client.loader import SelectionSampler, WithIds
from dataselect.client.session import Batch, Session


class SelectionCallback(pl.Callback):
    """A Lightning callback that trains on the samples a dataselect strategy picks; see the module docstring.

    Args:
        strategy: a registered strategy.
        model: the LightningModule being trained.
        train_set: the training set, a map-style data set of (input, target) items.
        batch_size: samples trained on per step.
        **session_kwargs: `dataselect.Session` arguments (fraction, options, server, epochs, ...);
            `epochs` defaults to the Trainer's `max_epochs`.
    """

    def __init__(self, strategy: str, model: torch.nn.Module, train_set: Any, *, batch_size: int = 64,
                 **session_kwargs):
        super().__init__()
        self._epochs_given = "epochs" in session_kwargs
        self.session = Session(strategy, model, **session_kwargs)
        self.train_set = train_set
        self.sampler = SelectionSampler(self.session, train_set, batch_size=batch_size)

    def train_dataloader(self, **dataloader_kwargs) -> torch.utils.data.DataLoader:
        """The DataLoader to fit on: index batches from the selection sampler, items with their ids."""
        return torch.utils.data.DataLoader(WithIds(self.train_set), batch_sampler=self.sampler, **dataloader_kwargs)

    def take(self, batch) -> Batch:
        """The samples to train on from a batch of `train_dataloader` (inputs, targets, ids)."""
        inputs, targets, ids = batch
        return self.session.take(inputs, targets, ids)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.session.loss(logits, targets)

    # -- the Trainer's events ------------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if not self._epochs_given and trainer.max_epochs and trainer.max_epochs > 0 and not self.session.is_open:
            self.session.epochs = int(trainer.max_epochs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.session.step()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.session.close()

    def state_dict(self) -> dict[str, Any]:
        return {"session": self.session.state_dict(), "loader": self.sampler.loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.load_state_dict(state_dict["session"])
        self.sampler.loader.load_state_dict(state_dict["loader"])
