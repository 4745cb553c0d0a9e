"""Property tests over random pools, through ScoringSession (the contract check included)."""

import torch
from hypothesis import given, settings, strategies as st

from dataselect.models import build_model
from dataselect.plugins.base import Progress
from dataselect.scoring import PoolChunk, ScoringSession

MODEL_KW = dict(num_classes=4, in_channels=1, image_size=8, mean=(0.5,), std=(0.5,))
FIXED = [("random", {}), ("high_loss", {}), ("high_gradient", {}), ("high_gradient", {"scope": "full"}),
         ("high_influence", {}), ("dynams", {}), ("dynams", {"kind": "logit"}), ("mrmc", {"warmup_epochs": 2}),
         ("importance_sampling", {"warmup_epochs": 0})]
VARIABLE = [("selective_backprop", {}), ("infobatch", {}), ("dynams", {"schedule": "power"})]
_STATE = build_model("mlp", **MODEL_KW).state_dict()


def session(name, opts, seed):
    s = ScoringSession(name, opts, "mlp", MODEL_KW, num_classes=4, seed=seed)
    s.load_state_dict(_STATE, 1)
    return s


pools = st.integers(1, 40).flatmap(lambda n: st.tuples(
    st.just(n),
    st.integers(1, n),
    st.lists(st.integers(0, 3), min_size=n, max_size=n),
    st.integers(0, 2**31 - 1),
    st.integers(0, 3),
))


def run(name, opts, n, budget, labels, seed, epoch):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(10 * n, generator=g)[:n]
    labels = torch.tensor(labels)
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    s = session(name, opts, seed)
    progress = Progress(epoch=epoch, total_epochs=4)
    if s.selector.uses_reports:
        for e in range(epoch + 1):  # reports for a random part of the pool
            part = ids[: max(1, n // 2)]
            s.report(part, torch.rand(part.numel(), generator=g) * 3, None, None, Progress(epoch=e, total_epochs=4))
    res = s.select([PoolChunk(ids=ids, labels=labels, inputs=x)], budget, progress=progress)
    return ids, res, s.selector


@settings(max_examples=25, deadline=None)
@given(pools, st.sampled_from(FIXED))
def test_fixed_budget_contract(p, strategy):
    n, budget, labels, seed, epoch = p
    name, opts = strategy
    ids, res, sel = run(name, opts, n, budget, labels, seed, epoch)
    got = res.selected_ids
    assert got.numel() == budget
    assert set(got.tolist()) <= set(ids.tolist())
    if not sel.with_replacement:
        assert got.unique().numel() == budget
    else:
        assert res.weights is not None and res.weights.numel() == budget
    _, again, _ = run(name, opts, n, budget, labels, seed, epoch)
    assert torch.equal(got, again.selected_ids)


@settings(max_examples=25, deadline=None)
@given(pools, st.sampled_from(VARIABLE))
def test_variable_budget_bounds(p, strategy):
    n, budget, labels, seed, epoch = p
    name, opts = strategy
    ids, res, sel = run(name, opts, n, budget, labels, seed, epoch)
    got = res.selected_ids
    assert not sel.exact_budget
    assert 1 <= got.numel() <= budget
    assert got.unique().numel() == got.numel()
    assert set(got.tolist()) <= set(ids.tolist())
    if res.weights is not None:
        assert res.weights.numel() == got.numel() and bool((res.weights > 0).all())
    _, again, _ = run(name, opts, n, budget, labels, seed, epoch)
    assert torch.equal(got, again.selected_ids)
