"""The public Python API: one training loop of your own gains selection, embedded or on a server, for an
online strategy (high_loss), a report-based one (infobatch) and a subset one (dynams)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dataselect
from dataselect.errors import InvalidArgument


def _data(n=600, d=20, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, d, generator=g)
    return x, y


class _MapStyle(torch.utils.data.Dataset):
    """A plain map-style data set of (input, target) items (no tensors exposed): the DataLoader path."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))


def _loop(strategy, dataset, *, epochs=3, **session_kwargs):
    """The README's loop: an ordinary PyTorch loop with the added lines marked."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = dataselect.Session(strategy, model, epochs=epochs, **session_kwargs)  # added
    loader = session.loader(dataset, batch_size=32)  # added
    with session:
        for _ in range(epochs):
            for x, y in loader:
                loss = session.loss(model(x), y)  # changed: was F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    return model, session, loader


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("strategy", ["high_loss", "infobatch", "dynams"])
def test_the_readme_loop_trains_with_each_kind_of_strategy_embedded(strategy):
    x, y = _data()
    model, session, loader = _loop(strategy, torch.utils.data.TensorDataset(x, y))
    assert _accuracy(model, x, y) > 0.9
    assert session.costs.samples_scored > 0 or session.uses_reports
    if strategy == "high_loss":
        assert session.mode == "online" and session.costs.samples_trained == 3 * 600 // 2  # half of each pool
    if strategy == "dynams":
        # one warm-up epoch on all the data (the paper's), then a core-set each epoch
        assert session.costs.refreshes == 2 and session.costs.full_data_epochs == 1
        assert loader.last_selection_size == 300
    if strategy == "infobatch":
        # prunes part of the well-learned samples after the first epoch, trains on the rest
        assert session.costs.samples_trained < 3 * 600 and session.uses_reports


@pytest.mark.parametrize("strategy", ["high_loss", "infobatch", "dynams"])
def test_tensors_and_a_map_style_dataset_through_a_dataloader_select_the_same_samples(strategy):
    x, y = _data(n=300)
    _, a, _ = _loop(strategy, torch.utils.data.TensorDataset(x, y), epochs=2)
    _, b, _ = _loop(strategy, _MapStyle(x, y), epochs=2)
    assert a.digest.hexdigest() == b.digest.hexdigest()  # ids are data set indices on both paths


def test_online_batches_are_the_highest_loss_rows_of_each_pool_with_ids():
    x, y = _data(n=256)
    model = _model()
    session = dataselect.Session("high_loss", model, epochs=1, fraction=0.25)
    loader = session.loader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    batch = next(iter(loader))
    assert isinstance(batch, dataselect.Batch) and batch.inputs.shape == (16, 20)
    assert torch.equal(batch.inputs, x[batch.ids]) and torch.equal(batch.targets, y[batch.ids])
    # the pool was the first 64 of the epoch's shuffle; the batch holds its 16 highest losses
    pool = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:64]
    with torch.no_grad():
        losses = F.cross_entropy(model(x[pool]), y[pool], reduction="none")
    assert set(batch.ids.tolist()) == set(pool[torch.topk(losses, 16).indices].tolist())
    session.close()


def test_select_on_a_pool_of_your_own_returns_rows_and_weights():
    x, y = _data(n=64)
    model = _model()
    with dataselect.Session("high_loss", model, fraction=0.25) as session:
        chosen = session.select(x, y, ids=torch.arange(1000, 1064))
        assert chosen.rows.shape == (16,) and torch.equal(chosen.ids, chosen.rows + 1000)
        with torch.no_grad():
            losses = F.cross_entropy(model(x), y, reduction="none")
        assert set(chosen.rows.tolist()) == set(torch.topk(losses, 16).indices.tolist())
    with dataselect.Session("importance_sampling", model, fraction=0.5, mode="weighted",
                            options={"warmup_epochs": 0}) as session:
        chosen = session.select(x, y, ids=torch.arange(64))
        assert chosen.weights is not None and chosen.weights.shape == chosen.rows.shape


def test_reports_are_a_no_op_for_strategies_that_do_not_use_them_and_reach_those_that_do():
    x, y = _data(n=64)
    model = _model()
    with dataselect.Session("high_loss", model) as session:
        session.open(dataset_size=64)
        session.report(torch.arange(64), torch.rand(64))  # nothing to do, no error
        assert session.costs.report_seconds == 0.0
    with dataselect.Session("infobatch", model, epochs=4) as session:
        session.open(dataset_size=64)
        session.report(torch.arange(64), torch.linspace(0, 1, 64))
        chosen = session.select(x, y, ids=torch.arange(64), progress=dataselect.Progress(epoch=1, total_epochs=4))
        # InfoBatch pruned part of the below-mean losses and up-weighted the kept ones
        assert 32 <= chosen.rows.numel() < 64 and chosen.weights.max() > 1.0


def test_a_session_refuses_what_it_cannot_do_with_the_fix_in_the_message():
    with pytest.raises(InvalidArgument, match="nn.Module"):
        dataselect.Session("high_loss", None)
    with pytest.raises(InvalidArgument, match="unknown strategy"):
        dataselect.Session("nope", _model())
    with pytest.raises(InvalidArgument, match="fraction"):
        dataselect.Session("high_loss", _model(), fraction=0)
    with pytest.raises(InvalidArgument, match="known options"):
        dataselect.Session("high_loss", _model(), options={"beta": 1})
    with pytest.raises(InvalidArgument, match="has no port: give HOST:PORT"):  # checked at once, not at open
        dataselect.Session("high_loss", _model(), server="localhost")
    # a module the server has no code for is shipped as an exported program: that needs an example input
    session = dataselect.Session("high_loss", _model(), server="127.0.0.1:1", num_classes=2)
    with pytest.raises(InvalidArgument, match="needs an example input"):
        session.open(dataset_size=10)

    class Branchy(torch.nn.Module):  # a Python branch on tensor values cannot be exported
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(20, 2)

        def forward(self, x):
            return self.fc(x) if float(x.sum()) > 0 else -self.fc(x)

    session = dataselect.Session("high_loss", Branchy(), server="127.0.0.1:1", num_classes=2)
    with pytest.raises(InvalidArgument, match="torch.export could not capture Branchy"):
        session.open(dataset_size=10, example=torch.ones(2, 20))


@pytest.mark.parametrize("strategy", ["high_loss", "infobatch", "dynams"])
def test_the_same_loop_scores_on_a_server_with_the_same_selections(server, strategy):
    """A registered model (made by dataselect.build_model) is one a server can build; with overlap off,
    the remote run makes exactly the embedded run's selections."""
    from dataselect.datasets import open_dataset

    data = open_dataset("synthetic", train_subset=400)
    digests, accuracy = {}, {}
    for where in (None, server.address):
        torch.manual_seed(0)
        model = dataselect.build_model("mlp", **data.info.model_kwargs())
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        session = dataselect.Session(strategy, model, epochs=2, server=where, overlap=False)
        loader = session.loader(data.train_tensors, batch_size=32)
        with session:
            for _ in range(2):
                for x, y in loader:
                    loss = session.loss(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        assert session.remote == (where is not None)
        digests[where] = session.digest.hexdigest()
        accuracy[where] = _accuracy(model, data.test_tensors.inputs, data.test_tensors.labels)
    assert digests[None] == digests[server.address]
    assert accuracy[None] == accuracy[server.address] > 0.5


@pytest.mark.parametrize("strategy", ["high_loss", "dynams", "infobatch"])
def test_a_batch_sampler_in_a_dataloader_of_your_own_selects_what_the_loader_does(strategy):
    x, y = _data(n=300)
    _, via_loader, _ = _loop(strategy, torch.utils.data.TensorDataset(x, y), epochs=2)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = _MapStyle(x, y)
    with dataselect.Session(strategy, model, epochs=2) as session:
        loader = torch.utils.data.DataLoader(dataselect.WithIds(data), batch_sampler=session.batch_sampler(data, 32))
        for _ in range(2):
            for xb, yb, ids in loader:
                xb, yb = session.take(xb, yb, ids)
                loss = session.loss(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                session.step()
    assert session.digest.hexdigest() == via_loader.digest.hexdigest()
    assert session.costs.samples_trained == via_loader.costs.samples_trained
