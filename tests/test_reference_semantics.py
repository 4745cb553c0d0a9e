"""Reference behaviour of the published strategies, transcribed into small cases worked out by hand.

Each case states the reference's rule (from the authors' code where it is
published, else from the paper) and a handful of samples whose expected
selection follows from that rule by hand. The code of the references is not
used here; only their rules are.

* InfoBatch (Qin et al., ICLR 2024; the authors' ``infobatch.py``): each epoch the
  samples whose latest loss is below the mean of all latest losses are "well
  learned"; ⌊(1 − r)·|L|⌋ of them, drawn at random, are kept with weight
  1/(1 − r), the rest pruned; everything else is trained on with weight 1. The
  kept share is at least 0.1 (r at most 0.9). Epoch e (0-based) of E prunes
  while e + 1 ≤ δ·E. Nothing caps what is kept.
* Selective Backprop (Jiang et al., arXiv 2019; the authors'
  ``SelectiveBackpropper.py``, ``calculators.py``, ``hist.py``, ``selectors.py``):
  the first epoch trains on every sample (priming); then each forward batch's
  losses join a history of the last 1024 losses, and a sample is kept with
  probability (share of the history strictly below its loss)^β. No budget, no
  minimum: a batch may keep nothing.
* Importance sampling (Quercia et al., ICDM 2023): importance is estimated once,
  after a few epochs of normal training, from the training prediction
  probabilities, and samples are drawn by it for the rest of training.
* DynaMS (Wang et al., ICLR 2023): the model trains before the first selection.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dataselect
from dataselect.errors import InvalidArgument
from dataselect.plugins import get_selector
from dataselect.plugins.base import Pool, Progress, Report, SessionContext


def make(name, seed=0, **opts):
    return get_selector(name)(opts, SessionContext(num_classes=3, generator=torch.Generator().manual_seed(seed)))


def pool(ids, progress=None, **signals):
    ids = torch.as_tensor(ids, dtype=torch.long)
    return Pool(ids=ids, labels=torch.zeros_like(ids), signals=signals, progress=progress or Progress())


def at(epoch, total=10):
    return Progress(epoch=epoch, total_epochs=total, fraction=epoch / total)


# -- InfoBatch ---------------------------------------------------------------------------------

#: Six samples: mean loss (0.1 + 0.2 + 0.3 + 0.4 + 2.0 + 3.0) / 6 = 1.0, so ids 0-3 are well learned.
SIX = torch.tensor([0.1, 0.2, 0.3, 0.4, 2.0, 3.0])


def infobatch_after(losses, **opts):
    sel = make("infobatch", **opts)
    sel.on_report(Report(torch.arange(len(losses)), torch.as_tensor(losses, dtype=torch.float32), None, None, at(0)))
    return sel


def kept(selection):
    return sorted(selection.indices.tolist())


def test_infobatch_keeps_half_of_the_well_learned_with_weight_two_and_all_the_rest():
    out = infobatch_after(SIX, prune_ratio=0.5).select(pool(range(6), at(1)), 6, "topk")
    # |L| = 4: floor(0.5 * 4) = 2 of ids 0-3 are kept (weight 2), ids 4 and 5 always (weight 1).
    chosen = kept(out)
    assert len(chosen) == 4 and {4, 5} <= set(chosen)
    weights = dict(zip(out.indices.tolist(), out.weights.tolist()))
    assert [weights[i] for i in chosen] == [2.0, 2.0, 1.0, 1.0]


def test_infobatch_keeps_the_floor_of_the_kept_share():
    # Mean (0.1 + ... + 0.5 + 5.0) / 6 = 1.083: |L| = 5, floor(0.5 * 5) = 2 kept, 3 pruned: 3 samples in all.
    out = infobatch_after([0.1, 0.2, 0.3, 0.4, 0.5, 5.0], prune_ratio=0.5).select(pool(range(6), at(1)), 6, "topk")
    assert len(kept(out)) == 3 and 5 in kept(out)


def test_infobatch_prune_ratio_stops_at_the_authors_clamp_of_0_9():
    # Ten samples at 0.1 and one at 10.0: mean 1.0, |L| = 10, keep floor(0.1 * 10) = 1 with weight 10.
    out = infobatch_after([0.1] * 10 + [10.0], prune_ratio=0.9).select(pool(range(11), at(1)), 11, "topk")
    assert len(kept(out)) == 2 and 10 in kept(out)
    assert sorted(out.weights.tolist()) == [1.0, 10.0]
    with pytest.raises(InvalidArgument, match="prune_ratio"):
        make("infobatch", prune_ratio=0.95)


def test_infobatch_mean_is_over_every_reported_loss_not_the_pool():
    # Pool ids 0-3 only (losses 0.1-0.4): the mean of everything reported is 1.0, so all four are well learned
    # and floor(0.5 * 4) = 2 are kept. (The pool's own mean, 0.25, would call only two of them well learned.)
    out = infobatch_after(SIX, prune_ratio=0.5).select(pool(range(4), at(1)), 4, "topk")
    assert len(kept(out)) == 2 and out.weights.tolist() == [2.0, 2.0]


@pytest.mark.parametrize("total,last_pruned", [(10, 7), (8, 6), (4, 2)])
def test_infobatch_prunes_while_epoch_plus_one_is_at_most_anneal_times_epochs(total, last_pruned):
    # anneal 0.875: E = 10 -> 8.75, epochs 0-7 prune; E = 8 -> 7, epochs 0-6; E = 4 -> 3.5, epochs 0-2.
    sel = infobatch_after(SIX, prune_ratio=0.5, anneal=0.875)
    sizes = [len(kept(sel.select(pool(range(6), at(e, total)), 6, "topk"))) for e in range(total)]
    assert sizes == [4] * (last_pruned + 1) + [6] * (total - last_pruned - 1)
    late = sel.select(pool(range(6), at(total - 1, total)), 6, "topk")
    assert late.weights.tolist() == [1.0] * 6


def test_infobatch_first_epoch_keeps_everything():
    # Nothing reported yet: nothing is well learned (the authors start every score equal, so none is below the mean).
    out = make("infobatch").select(pool(range(5), at(0)), 5, "topk")
    assert kept(out) == [0, 1, 2, 3, 4] and out.weights.tolist() == [1.0] * 5


# -- Selective Backprop ---------------------------------------------------------------------------

def sb(losses, sel=None, **opts):
    sel = sel or make("selective_backprop", **opts)
    return sel, sel.select(pool(range(len(losses)), loss=torch.tensor(losses, dtype=torch.float32)), len(losses), "topk")


def test_selective_backprop_percentile_counts_the_losses_strictly_below():
    # History = the pool itself, [1, 2, 3, 4]: strictly below are 0, 1, 2, 3 of 4; beta = 1.
    _, out = sb([1.0, 2.0, 3.0, 4.0], beta=1.0)
    assert out.scores.tolist() == [0.0, 0.25, 0.5, 0.75]


def test_selective_backprop_equal_losses_are_never_kept():
    # No loss is strictly below 2.0: every probability is 0^3 = 0, so the batch keeps nothing.
    _, out = sb([2.0, 2.0, 2.0, 2.0], beta=3.0)
    assert out.scores.tolist() == [0.0] * 4 and out.indices.numel() == 0


def test_selective_backprop_may_keep_nothing():
    # beta = 50: the largest probability is 0.75^50 = 5.7e-7; nothing is drawn and nothing is forced in.
    _, out = sb([1.0, 2.0, 3.0, 4.0], beta=50.0)
    assert out.scores[3].item() == pytest.approx(0.75 ** 50, rel=1e-5)
    assert out.indices.numel() == 0


def test_selective_backprop_history_spans_pools_and_slides():
    # Unbounded (1024): [1, 2, 3, 4] then [2.5]: history [1, 2, 3, 4, 2.5], two below 2.5: 2/5.
    sel, _ = sb([1.0, 2.0, 3.0, 4.0], beta=1.0)
    _, out = sb([2.5], sel)
    assert out.scores.tolist() == [pytest.approx(0.4)]
    # history=4: [1, 2, 3, 4] then [0.5, 10]: history [3, 4, 0.5, 10]: 0 below 0.5, 3 below 10.
    sel, _ = sb([1.0, 2.0, 3.0, 4.0], beta=1.0, history=4)
    _, out = sb([0.5, 10.0], sel)
    assert out.scores.tolist() == [0.0, 0.75]


def test_selective_backprop_beta_zero_keeps_every_candidate_whatever_the_fraction():
    x, y = _data(64)
    with dataselect.Session("selective_backprop", _model(), fraction=0.25,
                            options={"beta": 0.0, "warmup_epochs": 0}) as session:
        chosen = session.select(x, y, ids=torch.arange(64))
    assert sorted(chosen.rows.tolist()) == list(range(64))  # a 1/4 cap would have kept 16


def test_selective_backprop_primes_with_one_full_epoch():
    assert get_selector("selective_backprop").options["warmup_epochs"].default == 1.0
    trained = _epochs("selective_backprop", epochs=2, n=256, fraction=0.5)
    assert trained[0] == 256  # the first epoch trains on every sample
    assert trained[1] < 256  # then beta = 3 keeps about a quarter of each pool


# -- importance sampling ------------------------------------------------------------------------------

def test_importance_sampling_estimates_once_after_warmup():
    sel = make("importance_sampling", warmup_epochs=1, momentum=0.0, epsilon=0.0)
    assert sel.opts["estimate"] == "once"
    ids = torch.arange(4)
    sel.on_report(Report(ids, torch.zeros(4), torch.tensor([1.0, 0.8, 0.5, 0.0]), None, Progress(epoch=0)))
    # w = 1 - p = [0, 0.2, 0.5, 1]: q = w / 1.7.
    expect = [0.0, 0.2 / 1.7, 0.5 / 1.7, 1.0 / 1.7]
    first = sel.select(pool(ids, Progress(epoch=1)), 8, "topk")
    assert first.scores.tolist() == pytest.approx(expect)
    sel.on_report(Report(ids, torch.zeros(4), torch.tensor([0.0, 0.0, 0.0, 1.0]), None, Progress(epoch=1)))
    again = sel.select(pool(ids, Progress(epoch=2)), 8, "topk")
    assert again.scores.tolist() == pytest.approx(expect)  # the later report changed nothing


def test_importance_sampling_estimate_averages_the_warmup_epochs():
    # momentum 0.5 over two warm-up epochs: w = [1, 0] then 0.5 w + 0.5 [0, 1] = [0.5, 0.5].
    sel = make("importance_sampling", warmup_epochs=2, momentum=0.5, epsilon=0.0)
    ids = torch.arange(2)
    sel.on_report(Report(ids, torch.zeros(2), torch.tensor([0.0, 1.0]), None, Progress(epoch=0)))
    sel.on_report(Report(ids, torch.zeros(2), torch.tensor([1.0, 0.0]), None, Progress(epoch=1)))
    assert sel.select(pool(ids, Progress(epoch=2)), 4, "topk").scores.tolist() == [0.5, 0.5]


# -- DynaMS ----------------------------------------------------------------------------------------------

def test_dynams_trains_before_its_first_selection():
    assert get_selector("dynams").options["warmup_epochs"].default == 1.0
    trained = _epochs("dynams", epochs=2, n=200, fraction=0.25)
    assert trained == [200, 50]  # a full-data epoch, then the 50 smallest margins


# -- InfoBatch through a session: nothing caps what it keeps ----------------------------------------------

def test_infobatch_trains_on_everything_it_keeps_whatever_the_fraction():
    trained = _epochs("infobatch", epochs=3, n=300, fraction=0.5)
    assert trained[0] == 300  # nothing reported yet: every sample (a cap at the fraction gave 150)
    # Epoch 1 (2 <= 0.875 * 3) prunes half of the below-mean samples: more than the fraction's 150, fewer than
    # all; epoch 2 (3 > 2.625) trains on everything again.
    assert 150 < trained[1] < 300 and trained[2] == 300


# -- helpers ------------------------------------------------------------------------------------------

def _data(n, d=20, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))


def _epochs(strategy, *, epochs, n, fraction):
    """Samples trained in each epoch of an ordinary loop with `strategy` (embedded session)."""
    x, y = _data(n)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = dataselect.Session(strategy, model, epochs=epochs, fraction=fraction)
    loader = session.loader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    per_epoch = []
    with session:
        for _ in range(epochs):
            before = session.costs.samples_trained
            for xb, yb in loader:
                loss = session.loss(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
            per_epoch.append(session.costs.samples_trained - before)
    return per_epoch
