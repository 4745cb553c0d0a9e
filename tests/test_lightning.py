"""The PyTorch Lightning adapter: a LightningModule trains on what the strategy picks (the `lightning` extra)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from dataselect.client.lightning import SelectionCallback  # noqa: E402


def _data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 16, generator=g) * 2
    y = torch.randint(0, 4, (n,), generator=g)
    return torch.utils.data.TensorDataset(centres[y] + torch.randn(n, 16, generator=g), y)


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.selection: SelectionCallback | None = None
        self.trained = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = self.selection.take(batch)
        self.trained += len(y)
        return self.selection.loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(strategy, **kwargs):
    data = _data()
    module = Module()
    selection = SelectionCallback(strategy, module, data, batch_size=32, **kwargs)
    module.selection = selection
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[selection],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=selection.train_dataloader())
    x, y = data.tensors
    with torch.no_grad():
        accuracy = float((module(x).argmax(1) == y).float().mean())
    return module, selection, trainer, accuracy


def test_online_selection_scores_each_pool_at_its_step_and_counts_every_step():
    module, selection, trainer, accuracy = _fit("high_loss")
    session = selection.session
    assert session.epochs == 3  # from the Trainer's max_epochs
    assert module.trained == 3 * 512 // 2 == session.costs.samples_trained  # half of every pool
    assert session.steps == trainer.global_step == 3 * 8
    assert session.costs.samples_scored == 3 * 512
    assert session.checkpoint_version == session.steps + 1  # pushed first, then after every step (sync_every=1)
    assert accuracy > 0.9


def test_subset_and_report_based_strategies_through_the_trainer():
    module, selection, trainer, accuracy = _fit("dynams")
    # one warm-up epoch on all the data (the paper's), then half of it in each later epoch
    assert selection.session.costs.refreshes == 2 and module.trained == 512 + 2 * 256
    assert accuracy > 0.9
    module, selection, trainer, accuracy = _fit("infobatch")
    assert selection.session.uses_reports and module.trained < 3 * 512  # InfoBatch pruned well-learned samples
    assert accuracy > 0.9
