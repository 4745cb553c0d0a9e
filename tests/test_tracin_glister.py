"""tracin and glister on hand-computed pools, against autograd, and end to end on the synthetic dataset."""

import math
import random
import warnings

import pytest
import torch

from dataselect.errors import InvalidArgument
from dataselect.registry import get_strategy, strategies
from dataselect.plugins.base import Pool, Progress, RunPlan, SessionContext
from dataselect.plugins.strategies.glister import (
    glister_greedy,
    last_layer_inputs,
    taylor_gains,
    validation_gradient,
)
from dataselect.plugins.strategies.tracin import step_size


def make(name, seed=0, **opts):
    ctx = SessionContext(num_classes=3, seed=seed, generator=torch.Generator().manual_seed(0))
    return get_strategy(name)(opts, ctx)


def pool(ids, labels=None, step=0, fraction=0.0, **signals):
    ids = torch.as_tensor(ids, dtype=torch.long)
    labels = torch.zeros_like(ids) if labels is None else torch.as_tensor(labels, dtype=torch.long)
    return Pool(ids=ids, labels=labels, signals=signals, progress=Progress(step=step, fraction=fraction))


def test_both_are_registered_and_declare_their_modes():
    assert {"tracin", "glister"} <= set(strategies())
    assert get_strategy("tracin").default_mode == "subset" and get_strategy("glister").default_mode == "subset"
    assert get_strategy("tracin").select_kind == "score_then_policy"
    assert get_strategy("tracin").default_policy == "class_balanced"
    assert get_strategy("glister").select_kind == "whole_pool"


# -- tracin ------------------------------------------------------------------------------------
def test_tracin_step_sizes():
    assert step_size("constant", Progress(fraction=0.7)) == 1.0
    assert step_size("linear", Progress(fraction=0.25)) == pytest.approx(0.75)
    assert step_size("cosine", Progress(fraction=0.5)) == pytest.approx(0.5)  # (1 + cos(pi/2)) / 2
    assert step_size("cosine", Progress(fraction=1.0)) == pytest.approx(0.0)
    assert step_size("linear", Progress(fraction=3.0)) == 0.0  # t clamped to 1


def test_tracin_accumulates_self_influence_per_id_once_per_checkpoint():
    sel = make("tracin", eta="linear", prefer="high")
    # Checkpoint at step 5, t = 0 -> eta = 1: totals g^2 = 1, 4, 9.
    s = sel.score(pool([10, 11, 12], step=5, grad_norm_last=torch.tensor([1.0, 2.0, 3.0])))
    assert s.tolist() == pytest.approx([1.0, 4.0, 9.0])
    # The same checkpoint again (a retried Select): no second term, whatever the signal says.
    s = sel.score(pool([12, 10], step=5, grad_norm_last=torch.tensor([7.0, 7.0])))
    assert s.tolist() == pytest.approx([9.0, 1.0])
    # Step 9 at t = 0.5 -> eta = 0.5: id 11: 4 + 0.5*3^2 = 8.5; id 12: 9 + 0 = 9; new id 13: 0.5*2^2 = 2.
    s = sel.score(pool([11, 12, 13], step=9, fraction=0.5, grad_norm_last=torch.tensor([3.0, 0.0, 2.0])))
    assert s.tolist() == pytest.approx([8.5, 9.0, 2.0])
    rows = sel.table.rows(torch.tensor([10, 11, 12, 13]), create=False)
    assert sel.table.data["terms"][rows].tolist() == [1.0, 2.0, 2.0, 1.0]


def test_tracin_counts_checkpoint_versions_when_the_scorer_gives_them():
    """Two pushes between optimiser steps (a user's loop pushing twice) are two checkpoints; one version
    scored twice is one."""
    sel = make("tracin", prefer="high")
    p = pool([1, 2], step=3, grad_norm_last=torch.tensor([1.0, 2.0]))
    p.checkpoint_version = 7
    assert sel.score(p).tolist() == pytest.approx([1.0, 4.0])
    again = pool([1, 2], step=3, grad_norm_last=torch.tensor([1.0, 2.0]))
    again.checkpoint_version = 8  # same step, a newer checkpoint: a second term
    assert sel.score(again).tolist() == pytest.approx([2.0, 8.0])
    again.checkpoint_version = 8  # the same checkpoint once more: nothing added
    assert sel.score(again).tolist() == pytest.approx([2.0, 8.0])


def test_tracin_prefer_low_drops_the_most_self_influential():
    sel = make("tracin")
    out = sel.select(pool([1, 2, 3, 4], step=1, grad_norm_last=torch.tensor([0.5, 3.0, 1.0, 2.0])), 2, "topk")
    assert sorted(out.indices.tolist()) == [0, 2]  # g^2 = 0.25 and 1 kept; 9 and 4 left out
    # Next checkpoint: id 1 now has a large gradient, 0.25 + 16 = 16.25 > 4 + 0 (id 4): 2 and 4 kept? No:
    # totals are 1: 16.25, 2: 9 + 0 = 9, 3: 1 + 0 = 1, 4: 4 + 0 = 4 -> the lowest two are ids 3 and 4.
    out = sel.select(pool([1, 2, 3, 4], step=2, grad_norm_last=torch.tensor([4.0, 0.0, 0.0, 0.0])), 2, "topk")
    assert sorted(out.indices.tolist()) == [2, 3]
    # class_balanced (the default policy) drops within each class: ids 1, 2 are class 0, ids 3, 4 class 1;
    # totals 16.25, 9 | 1, 4 -> one of each class: id 2 (9 < 16.25) and id 3 (1 < 4).
    sel = make("tracin")
    sel.score(pool([1, 2, 3, 4], step=1, grad_norm_last=torch.tensor([0.5, 3.0, 1.0, 2.0])))
    out = sel.select(pool([1, 2, 3, 4], [0, 0, 1, 1], step=2, grad_norm_last=torch.tensor([4.0, 0.0, 0.0, 0.0])), 2,
                     "class_balanced")
    assert sorted(out.indices.tolist()) == [1, 2]
    full = make("tracin", gradient="full")
    assert full.signals == frozenset({"grad_norm_full"})


def test_tracin_plan_fits_the_warmup():
    tracin = get_strategy("tracin")
    opts = tracin.resolve_options({})
    assert opts["warmup_epochs"] == 1.0
    assert tracin.plan(opts, RunPlan(epochs=3, mode="subset")) == opts
    with pytest.raises(InvalidArgument, match="epochs 2 or more"):
        tracin.plan(opts, RunPlan(epochs=1, mode="subset"))
    with pytest.warns(UserWarning, match="half the run"):
        assert tracin.plan(opts, RunPlan(epochs=1, mode="online"))["warmup_epochs"] == 0.5
    with pytest.raises(InvalidArgument, match="prefer"):
        tracin.resolve_options({"prefer": "middle"})


# -- glister: the closed forms against autograd --------------------------------------------------
def test_glister_closed_forms_match_autograd_on_a_linear_layer():
    """The gain g_i·∇L_V and the validation logits after one SGD step equal autograd's on nn.Linear."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3).double()
    h, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    hv, yv = torch.randn(5, 4, dtype=torch.float64), torch.tensor([2, 2, 0, 1, 0])
    eta = 0.3

    def grads(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [layer.weight, layer.bias])])

    val_mean = grads(torch.nn.functional.cross_entropy(layer(hv), yv))
    per_sample = torch.stack([grads(torch.nn.functional.cross_entropy(layer(h[i:i + 1]), y[i:i + 1]))
                              for i in range(6)])
    with torch.no_grad():
        z, zv = layer(h), layer(hv)
    errors = z.softmax(1) - torch.nn.functional.one_hot(y, 3).double()
    a, av = last_layer_inputs(h, 6), last_layer_inputs(hv, 5)
    onehot_v = torch.nn.functional.one_hot(yv, 3).double()
    gains = taylor_gains(errors, a, validation_gradient(zv, onehot_v, av))
    assert torch.allclose(gains, per_sample @ val_mean, atol=1e-12)
    # One SGD step on the summed loss of samples {1, 4}: the validation logits move by -eta Σ (a_v·a_s) e_s.
    picked = torch.tensor([1, 4])
    step = grads(torch.nn.functional.cross_entropy(layer(h[picked]), y[picked], reduction="sum"))
    with torch.no_grad():
        layer.weight -= eta * step[:12].view(3, 4)
        layer.bias -= eta * step[12:]
        moved = layer(hv)
    assert torch.allclose(zv - eta * (av @ a[picked].T) @ errors[picked], moved, atol=1e-12)


# -- glister: a hand-computed greedy -------------------------------------------------------------
# Three classes, bias-only gradients (a_i = [1]), every logit 0, so p = (1/3, 1/3, 1/3) everywhere.
# Validation: one sample of class 0 and one of class 1 -> ∇L_V = mean(p - e_y) = (-1/6, -1/6, 1/3).
# Candidates P0, Q0 (class 0: e = (-2/3, 1/3, 1/3)) and R1 (class 1: e = (1/3, -2/3, 1/3)):
# gains e·∇L_V = 2/18 - 1/18 + 2/18 = 1/6 for all three (a three-way tie).
ZEROS3 = torch.zeros(3, 3, dtype=torch.float64)
LABELS = torch.tensor([0, 0, 1])
ERRORS = torch.full((3, 3), 1.0 / 3, dtype=torch.float64) - torch.nn.functional.one_hot(LABELS, 3).double()
VAL_ONEHOT = torch.nn.functional.one_hot(torch.tensor([0, 1]), 3).double()
ONES3, ONES2 = torch.ones(3, 1, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64)


def test_glister_greedy_hand_computed():
    first = taylor_gains(ERRORS, ONES3, validation_gradient(ZEROS3[:2], VAL_ONEHOT, ONES2))
    assert first.tolist() == pytest.approx([1 / 6] * 3)
    # Plain greedy (rgreedy with rounds = k = 2), eta = 3; ties go to pool order, so P0 first.
    # Its step moves both validation logits by -3·(1·1)·e_P0 = (2, -1, -1):
    # p_v = (e^2, e^-1, e^-1) / (e^2 + 2e^-1) = (0.90944, 0.04528, 0.04528),
    # ∇L_V = p_v - (1/2, 1/2, 0) = (0.40944, -0.45472, 0.04528).
    # Gains now: Q0 = -2/3·0.40944 + 1/3·(-0.45472) + 1/3·0.04528 = -0.40944,
    #            R1 =  1/3·0.40944 - 2/3·(-0.45472) + 1/3·0.04528 =  0.45472  -> R1 is picked, not Q0.
    den = math.exp(2) + 2 * math.exp(-1)
    p = torch.tensor([math.exp(2) / den, math.exp(-1) / den, math.exp(-1) / den], dtype=torch.float64)
    grad = validation_gradient(torch.tensor([[2.0, -1, -1], [2.0, -1, -1]], dtype=torch.float64), VAL_ONEHOT, ONES2)
    assert grad.flatten().tolist() == pytest.approx((p - torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)).tolist())
    after = taylor_gains(ERRORS, ONES3, grad)
    assert after[1].item() == pytest.approx(-0.40944, abs=1e-5) and after[2].item() == pytest.approx(0.45472, abs=1e-5)
    picks, _ = glister_greedy(ERRORS, ONES3, ZEROS3[:2], VAL_ONEHOT, ONES2, 2, eta=3.0, greedy="rgreedy", rounds=2)
    assert picks.tolist() == [0, 2]
    # One round is top-k of the first gains: the tie goes to pool order, P0 and Q0 (same class twice).
    picks, _ = glister_greedy(ERRORS, ONES3, ZEROS3[:2], VAL_ONEHOT, ONES2, 2, eta=3.0, greedy="rgreedy", rounds=1)
    assert picks.tolist() == [0, 1]
    # Stochastic: (N/k) ln(1/0.01) = 6.9 >= 3, so each pick sees every candidate left; ties break at random,
    # but whichever class goes first, the update makes the other class win the second pick.
    for seed in range(8):
        picks, _ = glister_greedy(ERRORS, ONES3, ZEROS3[:2], VAL_ONEHOT, ONES2, 2, eta=3.0, rng=random.Random(seed))
        assert sorted(LABELS[picks].tolist()) == [0, 1]


def test_glister_rgreedy_splits_the_budget_exactly():
    torch.manual_seed(1)
    e = torch.randn(50, 4, dtype=torch.float64)
    a = torch.randn(50, 3, dtype=torch.float64)
    for k, rounds in ((7, 15), (20, 3), (50, 4), (1, 1)):
        picks, first = glister_greedy(e, a, torch.randn(6, 4, dtype=torch.float64),
                                      torch.nn.functional.one_hot(torch.arange(6) % 4, 4).double(),
                                      torch.randn(6, 3, dtype=torch.float64), k, eta=0.1, greedy="rgreedy",
                                      rounds=rounds)
        assert picks.numel() == k and picks.unique().numel() == k and first.shape == (50,)


# -- glister: the held-out validation share ------------------------------------------------------
def test_glister_holds_out_a_fixed_seeded_share_of_ids():
    sel = make("glister", seed=3, validation=0.1)
    ids = torch.arange(20_000)
    held = sel.held_out(ids)
    assert abs(held.double().mean().item() - 0.1) < 0.01
    # The same ids are held out whatever pool they come in, and by a new instance with the same seed.
    perm = torch.randperm(20_000, generator=torch.Generator().manual_seed(0))[:500]
    assert torch.equal(make("glister", seed=3, validation=0.1).held_out(perm), held[perm])
    other = make("glister", seed=4, validation=0.1).held_out(ids)
    assert not torch.equal(other, held)
    assert make("glister", validation=0.3).held_out(ids).double().mean().item() == pytest.approx(0.3, abs=0.01)


def _glister_pool(n, seed=0, classes=3, dim=4):
    g = torch.Generator().manual_seed(seed)
    return pool(torch.arange(100, 100 + n), torch.randint(0, classes, (n,), generator=g), step=1,
                logits=torch.randn(n, classes, generator=g), features=torch.randn(n, dim, generator=g))


@pytest.mark.parametrize("opts", [{}, {"greedy": "rgreedy"}, {"gradient": "bias"}])
def test_glister_never_selects_held_out_ids_within_the_candidates(opts):
    sel = make("glister", **opts)
    p = _glister_pool(300)
    held = sel.held_out(p.ids)
    n_val = int(held.sum())
    assert 10 < n_val < 60
    out = sel.select(p, 300 - n_val, "topk")
    assert out.indices.numel() == 300 - n_val == out.indices.unique().numel()
    assert not bool(held[out.indices].any())
    assert out.diagnostics == {"glister_validation": n_val, "glister_own_validation": 0}
    assert torch.isfinite(out.scores).all() and out.scores.shape == (300,)
    # A budget beyond the candidates is filled with held-out samples (exact budget).
    out = sel.select(p, 300, "topk")
    assert sorted(out.indices.tolist()) == list(range(300))
    # Other policies rank the first-round gains of the candidates.
    out = sel.select(p, 90, "class_balanced")
    assert out.indices.numel() == 90 and not bool(held[out.indices].any())


def test_glister_pool_without_held_out_ids_validates_on_itself():
    sel = make("glister")
    ids = [i for i in range(1000) if not sel.held_out(torch.tensor([i])).item()][:20]
    p = _glister_pool(20)
    p.ids = torch.tensor(ids)
    out = sel.select(p, 5, "topk")
    assert out.diagnostics == {"glister_validation": 20, "glister_own_validation": 1}
    assert out.indices.numel() == 5


def test_glister_is_the_greedy_on_the_pool_signals():
    """select() runs glister_greedy on the candidates' closed-form gradients and the held-out validation."""
    sel = make("glister", greedy="rgreedy", rounds=4, eta=0.5)
    p = _glister_pool(200, seed=2)
    held = sel.held_out(p.ids)
    cand, val = torch.nonzero(~held).flatten(), torch.nonzero(held).flatten()
    z = p.signals["logits"].float()
    onehot = torch.nn.functional.one_hot(p.labels, 3).float()
    a = last_layer_inputs(p.signals["features"], 200).float()
    e = z.softmax(1) - onehot
    expect, _ = glister_greedy(e[cand], a[cand], z[val], onehot[val], a[val], 40, eta=0.5, greedy="rgreedy", rounds=4)
    assert sel.select(p, 40, "topk").indices.tolist() == cand[expect].tolist()
    # Top-k of the first gains is a different set here: the rounds move the validation gradient.
    top = torch.argsort(taylor_gains(e[cand], a[cand], validation_gradient(z[val], onehot[val], a[val])),
                        descending=True)[:40]
    assert set(cand[top].tolist()) != set(cand[expect].tolist())


def test_glister_plan_warns_when_the_fraction_reaches_the_held_out_share():
    glister = get_strategy("glister")
    opts = glister.resolve_options({"validation": 0.2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert glister.plan(opts, RunPlan(epochs=2, mode="subset", select_fraction=0.5)) == opts
    with pytest.warns(UserWarning, match="held-out"):
        glister.plan(opts, RunPlan(epochs=2, mode="subset", select_fraction=0.9))
    with pytest.raises(InvalidArgument, match="validation"):
        glister.resolve_options({"validation": 0.9})


# -- end to end ----------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,trained", [("tracin", 300 + 150), ("glister", 150 + 150)])
def test_train_end_to_end_on_synthetic(strategy, trained):
    from dataselect.client.train import TrainConfig, train

    s = train(TrainConfig(strategy=strategy, dataset="synthetic", train_subset=300, test_subset=200, epochs=2,
                          device="cpu", threads=1, progress=False, label_noise=0.2, batch_size=32))
    assert s["mode"] == "subset" and s["refresh_every"] == 1
    # tracin: one full-data warm-up epoch, then half the set; glister: half the set in both epochs.
    assert s["samples_trained"] == trained
    assert 0 < s["noisy_samples_trained"] < s["samples_trained"]
    assert s["refreshes"] == (1 if strategy == "tracin" else 2)  # a whole-set selection every epoch after warm-up
    assert s["test_accuracy"] > 0.1  # above chance (10 classes); 300 samples and 2 epochs learn little more
