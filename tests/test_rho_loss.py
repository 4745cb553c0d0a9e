"""RHO-LOSS (Mindermann et al., ICML 2022): reducible holdout loss against a hand-computed case, the
irreducible-loss model's cache on the scoring side, and the trainer training and pushing that model
embedded, on a server, across a resume and as a selection cost."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dataselect
from dataselect.errors import FailedPrecondition, InvalidArgument
from dataselect.holdout import HoldOut
from dataselect.plugins.base import Progress
from dataselect.scoring import PoolChunk, ScoringSession


def _linear(scale: float) -> nn.Module:
    """logits = scale * x for 2-d inputs and 2 classes."""
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.copy_(scale * torch.eye(2))
        m.bias.zero_()
    return m


def _session(holdout=0.01, seed=0) -> ScoringSession:
    s = ScoringSession("rho_loss", {"holdout": holdout}, _linear(1.0), num_classes=2, seed=seed, input_shape=(2,))
    s.load_state_dict(_linear(1.0).state_dict(), 1)
    return s


def _ids_not_held(n, share, seed=0):
    held = HoldOut(share, seed)
    return [i for i in range(1000) if not held(torch.tensor([i])).item()][:n]


# The hand-computed case: cross-entropy CE(z, y) = log(e^z0 + e^z1) - z_y.
# Target model logits = x; irreducible-loss model logits = 2x.
#   A x=(1,0) y=0: CE = log(1+e) - 1 = 0.3133, IL = log(e^2+1) - 2 = 0.1269, reducible  0.1864
#   B x=(0,1) y=0: CE = log(1+e)     = 1.3133, IL = log(1+e^2)     = 2.1269, reducible -0.8136
#   C x=(2,0) y=1: CE = log(e^2+1)   = 2.1269, IL = log(e^4+1)     = 4.0181, reducible -1.8912
#   D x=(0,0) y=1: CE = log 2        = 0.6931, IL = log 2          = 0.6931, reducible  0
# High loss would train on C and B; RHO-LOSS trains on A and D.
_X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
_Y = torch.tensor([0, 0, 1, 1])
_REDUCIBLE = [math.log(1 + math.e) - 1 - (math.log(math.e ** 2 + 1) - 2),
              math.log(1 + math.e) - math.log(1 + math.e ** 2),
              math.log(math.e ** 2 + 1) - math.log(math.e ** 4 + 1),
              0.0]


def test_scores_are_the_training_loss_minus_the_irreducible_loss_by_hand():
    s = _session()
    s.load_irreducible(_linear(2.0).state_dict())
    ids = torch.tensor(_ids_not_held(4, 0.01))
    res = s.select([PoolChunk(ids=ids, labels=_Y, inputs=_X)], 2, progress=Progress(), return_scores=True)
    assert res.scores.tolist() == pytest.approx(_REDUCIBLE, abs=1e-5)
    assert sorted(res.selected_ids.tolist()) == sorted([ids[0].item(), ids[3].item()])
    # plain high loss on the same pool picks the other two: the irreducible loss is what changes the choice
    hl = ScoringSession("high_loss", {}, _linear(1.0), num_classes=2, input_shape=(2,))
    hl.load_state_dict(_linear(1.0).state_dict(), 1)
    res = hl.select([PoolChunk(ids=ids, labels=_Y, inputs=_X)], 2, progress=Progress())
    assert sorted(res.selected_ids.tolist()) == sorted([ids[1].item(), ids[2].item()])


def test_held_out_ids_are_never_selected_while_others_remain():
    share = 0.5
    held = HoldOut(share, 0)
    flags = held(torch.arange(100))
    h = torch.nonzero(flags)[0].item()  # a held-out id
    free = torch.nonzero(~flags)[:3, 0].tolist()
    s = _session(holdout=share)
    s.load_irreducible(_linear(2.0).state_dict())
    # the held-out id carries sample A, the highest reducible loss
    ids = torch.tensor([h] + free)
    res = s.select([PoolChunk(ids=ids, labels=_Y, inputs=_X)], 2, progress=Progress(), return_scores=True)
    assert h not in res.selected_ids.tolist()
    assert res.scores[0] < res.scores[1:].min()


def test_irreducible_losses_are_computed_once_per_id_and_a_new_model_clears_them():
    s = _session()
    s.load_irreducible(_linear(2.0).state_dict())
    calls = []
    s.irreducible.module.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    ids = torch.tensor(_ids_not_held(4, 0.01))
    chunk = PoolChunk(ids=ids, labels=_Y, inputs=_X)
    s.select([chunk], 2, progress=Progress())
    assert sum(calls) == 4
    s.load_state_dict(_linear(0.5).state_dict(), 2)  # the target model moves: the cache stays
    s.select([chunk], 2, progress=Progress())
    more = PoolChunk(ids=torch.cat([ids[:2], ids[:2] + 5000]), labels=_Y, inputs=_X)
    s.select([more], 2, progress=Progress())
    assert sum(calls) == 6  # only the two new ids
    assert len(s.irreducible_losses) == 6
    s.load_irreducible(_linear(3.0).state_dict())
    assert s.irreducible_losses == {}


def test_selecting_without_the_irreducible_model_names_the_fix():
    s = _session()
    ids = torch.tensor(_ids_not_held(4, 0.01))
    with pytest.raises(FailedPrecondition, match="fit_irreducible"):
        s.select([PoolChunk(ids=ids, labels=_Y, inputs=_X)], 2, progress=Progress())
    hl = ScoringSession("high_loss", {}, _linear(1.0), num_classes=2, input_shape=(2,))
    with pytest.raises(FailedPrecondition, match="irreducible_loss"):
        hl.load_irreducible(_linear(2.0).state_dict())
    with pytest.raises(InvalidArgument, match="does not fit"):
        s.load_irreducible(nn.Linear(2, 3).state_dict())


def test_a_checkpoint_with_the_irreducible_role_loads_the_second_model_and_keeps_the_version():
    from dataselect.checkpoint import make_checkpoint

    s = _session()
    ckpt = make_checkpoint("Linear", {}, _linear(2.0), version=7)
    ckpt["role"] = "irreducible"
    s.load_checkpoint(ckpt, 7)
    assert s.checkpoint_version == 1 and s.irreducible is not None
    ckpt["role"] = "teacher"
    with pytest.raises(InvalidArgument, match="role"):
        s.load_checkpoint(ckpt, 8)


def _data(n=500, d=20, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


def _run(server=None, epochs=2, state=None, **kw):
    from dataselect.datasets import open_dataset

    data = open_dataset("synthetic", train_subset=400)
    torch.manual_seed(0)
    model = dataselect.build_model("mlp", **data.info.model_kwargs())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    session = dataselect.Session("rho_loss", model, epochs=epochs, fraction=0.25, server=server, overlap=False,
                                 options={"holdout": 0.2, "il_epochs": 2}, **kw)
    if state is not None:
        session.load_state_dict(state)
    loader = session.loader(data.train_tensors, batch_size=16)
    trained = []
    with session:
        for _ in range(epochs):
            for xb, yb in loader:
                trained.append(session.current.ids.clone())
                loss = session.loss(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
        scoring = getattr(session.scorer, "session", None)  # embedded: the model the scorer holds
        held = None if scoring is None else {k: v.clone() for k, v in scoring.irreducible.module.state_dict().items()}
    return session, torch.cat(trained), data.train_tensors.ids, held


def test_the_loader_trains_the_irreducible_model_on_the_holdout_and_counts_it_as_selection_cost():
    session, trained, ids, _ = _run()
    held = HoldOut(0.2, 0)
    assert session.irreducible_figures["irreducible_holdout_samples"] == int(held(ids).sum()) > 0
    assert not bool(held(trained).any())  # never trained on a held-out sample
    costs = session.costs
    assert 0 < costs.irreducible_seconds <= costs.score_seconds
    assert session.state_dict()["irreducible"] is not None


def test_remote_selections_equal_the_embedded_ones_and_a_resume_pushes_the_saved_model(server):
    embedded, ids_embedded, _, _ = _run()
    remote, ids_remote, _, _ = _run(server=server.address)
    assert remote.remote
    assert torch.equal(ids_embedded, ids_remote)
    assert embedded.digest.hexdigest() == remote.digest.hexdigest()
    # a resumed session does not train the model again: it pushes the weights it saved
    state = embedded.state_dict()
    resumed, _, _, got = _run(epochs=1, state=state)
    assert resumed.irreducible_figures == {}
    assert resumed.costs.irreducible_seconds < embedded.costs.irreducible_seconds + 1.0
    for k, v in state["irreducible"].items():
        assert torch.equal(got[k], v)


def test_a_model_that_cannot_be_reinitialised_is_refused_with_the_fix():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(20, 4))

        def forward(self, x):
            return x @ self.w

    x, y = _data(n=100)
    session = dataselect.Session("rho_loss", Fixed(), fraction=0.5)
    with pytest.raises(InvalidArgument, match="reset_parameters"):
        next(iter(session.loader((x, y), batch_size=16)))


def test_every_replica_gets_the_irreducible_model_and_the_merged_selections_equal_the_embedded_ones():
    from dataselect.server import serve

    embedded, ids_embedded, _, _ = _run()
    with serve(port=0, device="cpu", workers=1) as a, serve(port=0, device="cpu", workers=1) as b:
        replicated, ids_replicated, _, _ = _run(server=f"{a.address},{b.address}")
    assert torch.equal(ids_embedded, ids_replicated)
