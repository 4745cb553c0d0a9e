"""Strategy logic on hand-made pools and reports (no model needed except via sessions)."""

import math
import warnings

import pytest
import torch

from dataselect.errors import InvalidArgument
from dataselect.plugins import get_strategy
from dataselect.plugins.base import Pool, Progress, Report, RunPlan, SessionContext
from dataselect.plugins.strategies.mrmc import fit_reduction


def make(name, **opts):
    ctx = SessionContext(num_classes=3, generator=torch.Generator().manual_seed(0))
    return get_strategy(name)(opts, ctx)


def pool(ids, labels=None, progress=None, **signals):
    ids = torch.as_tensor(ids, dtype=torch.long)
    labels = torch.zeros_like(ids) if labels is None else torch.as_tensor(labels, dtype=torch.long)
    return Pool(ids=ids, labels=labels, signals=signals, progress=progress or Progress())


def test_mrmc_fit_hand_computed():
    # ℓ^(r) = q w^-r exactly, r = 1..4: q = 2, w = 2 -> φ = 2 (1 - 2^-4) = 1.875.
    # Rising loss -> w clamped to 1 -> φ = 0; one epoch only -> φ = 0.
    r = torch.arange(1, 5, dtype=torch.float64)
    curves = torch.stack([2.0 * 2.0 ** -r, 3.0 * 1.5 ** -r, 0.5 * 1.2 ** r,
                          torch.tensor([1.0, math.nan, math.nan, math.nan], dtype=torch.float64)])
    phi = fit_reduction(curves, 4)
    assert phi[0].item() == pytest.approx(1.875, rel=1e-9)
    assert phi[1].item() == pytest.approx(3.0 * (1 - 1.5 ** -4), rel=1e-9)
    assert phi[2].item() == 0.0 and phi[3].item() == 0.0


def test_mrmc_reports_and_selection():
    sel = make("mrmc", warmup_epochs=3, rho=1.0)
    ids = torch.tensor([10, 11, 12])
    for e in range(3):
        losses = torch.tensor([1.0 * 2.0 ** -(e + 1), 4.0 * 1.1 ** -(e + 1), 1.0])
        sel.on_report(Report(ids, losses.float(), None, None, Progress(epoch=e)))
    phi = sel.reduction(ids)
    assert phi[0].item() == pytest.approx(1 - 2 ** -3, rel=1e-5)
    assert phi[1].item() == pytest.approx(4 * (1 - 1.1 ** -3), rel=1e-5)
    out = sel.select(pool([12, 11, 10], features=torch.randn(3, 4)), 2, "topk")
    assert out.indices.tolist() == [1, 2]  # id 11 (φ≈0.995), id 10 (φ=0.875); id 12 flat: φ=0


def test_mrmc_scoring_pass_is_the_last_point():
    # One warm-up epoch: reported loss 1.0 (r=1), scoring pass 0.5 (r=2)
    # -> w = 2, q = 2, H = 2: φ = 2 (1 - 2^-2) = 1.5. A loss that rose gets 0.
    sel = make("mrmc", warmup_epochs=1, rho=1.0)
    ids = torch.tensor([5, 6])
    sel.on_report(Report(ids, torch.tensor([1.0, 0.2]), None, None, Progress(epoch=0)))
    phi = sel.reduction(ids, torch.tensor([0.5, 0.4]))
    assert phi[0].item() == pytest.approx(1.5, rel=1e-6)
    assert phi[1].item() == 0.0
    out = sel.select(pool(ids, loss=torch.tensor([0.5, 0.4]), features=torch.randn(2, 3)), 1, "topk")
    assert out.indices.tolist() == [0]


def test_mrmc_balance_fills_budget_uniquely():
    sel = make("mrmc", warmup_epochs=2, rho=0.3, gamma=2.0)
    n = 40
    ids = torch.arange(n)
    for e in range(2):
        sel.on_report(Report(ids, torch.rand(n) + 0.1 * (2 - e), None, None, Progress(epoch=e)))
    p = pool(ids, labels=torch.arange(n) % 3, features=torch.randn(n, 5))
    out = sel.select(p, 10, "topk")
    assert out.indices.numel() == 10 and out.indices.unique().numel() == 10
    # The first ceil(rho*k) are the plain top by φ.
    phi = sel.reduction(ids).float()
    assert set(out.indices[:3].tolist()) == set(torch.argsort(phi, descending=True)[:3].tolist())


def test_selective_backprop_kept_fraction():
    beta = 3.0
    sel = make("selective_backprop", beta=beta, history=1024)
    g = torch.Generator().manual_seed(1)
    kept = total = 0
    for step in range(400):
        loss = torch.rand(64, generator=g) * 5
        out = sel.select(pool(torch.arange(64) + 64 * step, loss=loss), 64, "topk")
        kept += out.indices.numel()
        total += 64
    assert kept / total == pytest.approx(1 / (beta + 1), abs=0.02)


def test_selective_backprop_respects_budget():
    sel = make("selective_backprop", beta=0.0)  # F^0 = 1: keeps everything, capped by budget
    out = sel.select(pool(torch.arange(20), loss=torch.rand(20)), 5, "topk")
    assert out.indices.numel() == 5


def test_infobatch_prunes_below_mean_and_rescales():
    sel = make("infobatch", prune_ratio=0.5, anneal=0.875)
    n = 100
    ids = torch.arange(n)
    losses = torch.linspace(0, 1, n)
    sel.on_report(Report(ids, losses, None, None, Progress(epoch=0)))
    out = sel.select(pool(ids, progress=Progress(epoch=1, total_epochs=10)), n, "topk")
    low = losses < losses.mean()
    kept = torch.zeros(n, dtype=torch.bool)
    kept[out.indices] = True
    assert bool(kept[~low].all()), "only below-mean samples may be pruned"
    assert (~kept[low]).sum().item() == round(0.5 * low.sum().item())
    w = dict(zip(out.indices.tolist(), out.weights.tolist()))
    for i, wi in w.items():
        assert wi == pytest.approx(2.0 if low[i] else 1.0)
    # After anneal·epochs nothing is pruned and weights are 1.
    late = sel.select(pool(ids, progress=Progress(epoch=9, total_epochs=10)), n, "topk")
    assert late.indices.numel() == n and bool((late.weights == 1).all())


def test_infobatch_unseen_never_pruned():
    sel = make("infobatch")
    sel.on_report(Report(torch.arange(10), torch.linspace(0, 1, 10), None, None, Progress()))
    out = sel.select(pool(torch.arange(20), progress=Progress(epoch=0, total_epochs=4)), 20, "topk")
    assert set(range(10, 20)) <= set(out.indices.tolist())


def test_importance_sampling_draws_proportionally_after_warmup():
    sel = make("importance_sampling", warmup_epochs=2, momentum=0.0, epsilon=0.1)
    ids = torch.arange(4)
    p_true = torch.tensor([1.0, 0.8, 0.5, 0.0])  # w = 0, .2, .5, 1
    sel.on_report(Report(ids, -p_true.log(), p_true, None, Progress(epoch=0)))
    warm = sel.select(pool(ids, progress=Progress(epoch=1)), 4, "topk")
    assert sorted(warm.indices.tolist()) == [0, 1, 2, 3]
    out = sel.select(pool(ids, progress=Progress(epoch=2)), 40000, "topk")
    freq = torch.bincount(out.indices, minlength=4).double() / 40000
    expect = (1 - p_true.double()) + 0.1
    assert torch.allclose(freq, expect / expect.sum(), atol=0.01)
    assert bool((out.weights == 1).all())


def test_importance_sampling_ema_and_reweight():
    sel = make("importance_sampling", momentum=0.5, epsilon=0.0, reweight=True, warmup_epochs=0)
    ids = torch.arange(2)
    sel.on_report(Report(ids, torch.zeros(2), torch.tensor([0.0, 1.0]), None, Progress(epoch=0)))
    sel.on_report(Report(ids, torch.zeros(2), torch.tensor([1.0, 0.0]), None, Progress(epoch=1)))
    q = sel.probabilities(ids)
    assert torch.allclose(q, torch.tensor([0.5, 0.5], dtype=torch.float64))
    out = sel.select(pool(ids, progress=Progress(epoch=2)), 10, "topk")
    assert torch.allclose(out.weights, torch.ones(10))  # 1/(N q) with q = 1/2


@pytest.mark.parametrize("name,opts", [
    ("high_gradient", {"scope": "everything"}),
    ("high_gradient", {"nope": 1}),
    ("dynams", {"refresh": "often"}),
    ("dynams", {"refresh": 0}),
    ("mrmc", {"rho": 1.5}),
    ("mrmc", {"warmup_epochs": 2.5}),
    ("importance_sampling", {"reweight": "maybe"}),
    ("selective_backprop", {"beta": "x"}),
    ("infobatch", {"prune_ratio": 1.0}),
    ("infobatch", {"prune_ratio": 0.95}),
    ("mrmc", {"warmup_epochs": 10 ** 12}),
    ("mrmc", {"scoring_point": "off", "warmup_epochs": 1}),
    ("mrmc", {"scoring_point": True}),
    ("importance_sampling", {"estimate": "sometimes"}),
    ("selective_backprop", {"history": 10 ** 12}),
    ("dynams", {"warmup_epochs": -1}),
])
def test_options_validated(name, opts):
    with pytest.raises(InvalidArgument):
        make(name, **opts)


def test_instance_signals_follow_options():
    assert make("high_gradient").signals == {"grad_norm_last"}
    assert make("high_gradient", scope="full").signals == {"grad_norm_full"}
    assert make("dynams", kind="logit").signals == {"logit_margin"}
    assert make("dynams", schedule="power").exact_budget is False


def test_dynams_selects_smallest_margins_and_schedule():
    sel = make("dynams")
    m = torch.tensor([0.5, -1.0, 2.0, 0.1])
    assert sel.select(pool(torch.arange(4), boundary_margin=m), 2, "topk").indices.tolist() == [1, 3]
    sched = make("dynams", schedule="power", exponent=2.0)
    # E = 4: epoch 0 ends at t = 1/4: ceil(4 * (5/8)^2) = ceil(1.5625) = 2; the last epoch (3) ends at t = 1: 4.
    p0 = pool(torch.arange(4), boundary_margin=m, progress=Progress(epoch=0, total_epochs=4))
    p3 = pool(torch.arange(4), boundary_margin=m, progress=Progress(epoch=3, total_epochs=4))
    assert sched.select(p0, 4, "topk").indices.tolist() == [1, 3]
    assert sched.select(p3, 4, "topk").indices.numel() == 4


def test_dynams_power_schedule_reaches_the_budget_in_the_last_epoch():
    """It used to stop at ((2E-1)/2E)^k of the budget: 57 of 100 at E=2, k=2."""
    sched = make("dynams", schedule="power", exponent=2.0)
    margins = torch.linspace(-1, 1, 100)
    sizes = [sched.select(pool(torch.arange(100), boundary_margin=margins, progress=Progress(epoch=e, total_epochs=2)),
                          100, "topk").indices.numel() for e in range(2)]
    assert sizes == [math.ceil(100 * 0.75 ** 2), 100]  # epoch 0 ends at t = 1/2: (1.5/2)^2 = 0.5625


def test_dynams_psp_options():
    sel = make("dynams", proxy="psp", width_ratio=0.25, proxy_weight=2.0)
    assert (sel.proxy_width_ratio, sel.proxy_loss_weight) == (0.25, 2.0)
    assert make("dynams").proxy_width_ratio is None
    with pytest.raises(InvalidArgument, match=r"width_ratio=0.0 must be in \(0, 1\]"):
        make("dynams", proxy="psp", width_ratio=0)
    with pytest.raises(InvalidArgument, match="must be <= 1"):
        make("dynams", proxy="psp", width_ratio=1.5)
    with pytest.raises(InvalidArgument, match="width_ratio only apply with proxy=psp"):
        make("dynams", width_ratio=0.5)


# -- options are bounded at open -------------------------------------------------------------

def _numeric_options():
    from dataselect.registry import strategies

    for name in sorted(strategies()):
        for key, opt in get_strategy(name).options.items():
            if opt.type in (int, float):
                yield name, key, opt


@pytest.mark.parametrize("name,key,opt", list(_numeric_options()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_numeric_option_is_bounded_and_its_bounds_are_usable(name, key, opt):
    """Nothing accepted at open may fail later (warmup_epochs=10**12 once allocated a 10**12-column table at the
    first Report): every number has both bounds, and a session opens at either end."""
    assert opt.min is not None and opt.max is not None, f"{name}.{key} needs min= and max="
    with pytest.raises(InvalidArgument, match=key):
        make(name, **{key: opt.max * 10 + 1})
    extra = {"proxy": "psp"} if name == "dynams" and key in ("width_ratio", "proxy_weight", "agreement_sample") else {}
    if name == "mrmc" and key == "warmup_epochs":
        extra = {"scoring_point": "on"}
    for end in (opt.min, opt.max):
        if name == "dynams" and key == "width_ratio" and end == 0:
            continue  # (0, 1]: refused by the strategy itself, tested in test_dynams_psp_options
        make(name, **extra, **{key: opt.type(end)})


def test_mrmc_table_is_bounded_by_the_largest_warmup():
    sel = make("mrmc", warmup_epochs=get_strategy("mrmc").options["warmup_epochs"].max)
    sel.on_report(Report(torch.arange(1000), torch.rand(1000), None, None, Progress(epoch=0)))
    assert sel.table.data["loss"].numel() * 8 <= 1024 * 100 * 8  # rows grow by doubling from 64: 1024 × 100


# -- warm-ups fitted to the run (Strategy.plan) --------------------------------------------------

def plan(name, epochs, mode=None, **options):
    cls = get_strategy(name)
    return cls.plan(cls.resolve_options(options), RunPlan(epochs=epochs, mode=mode or cls.default_mode))


@pytest.mark.parametrize("name,epochs,mode,expect", [
    ("mrmc", 20, None, 10), ("mrmc", 10, None, 5), ("mrmc", 3, None, 1),
    ("importance_sampling", 3, None, 2), ("importance_sampling", 2, None, 1),
    ("selective_backprop", 2, None, 1.0), ("selective_backprop", 1, None, 0.5), ("selective_backprop", 1, "subset", 0),
    ("dynams", 2, None, 1.0), ("dynams", 1, "online", 0.5), ("dynams", 3, "online", 1.0),
])
def test_a_warmup_that_fits_is_kept_and_one_that_fills_the_run_is_halved_with_a_warning(name, epochs, mode, expect):
    default = get_strategy(name).options["warmup_epochs"].default
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = plan(name, epochs, mode)["warmup_epochs"]
    assert got == expect and type(got) is type(get_strategy(name).options["warmup_epochs"].default)
    if expect == default:
        assert not caught
    else:
        assert len(caught) == 1
        text = str(caught[0].message)
        assert f"warmup_epochs={default:g}" in text and f"using warmup_epochs={expect:g}" in text and name in text


@pytest.mark.parametrize("name,mode,fix", [
    ("mrmc", None, "--epochs 2"), ("importance_sampling", None, "--epochs 2"),
    ("dynams", "subset", "--mode online"), ("dynams", "weighted", "warmup_epochs=0"),
])
def test_a_one_epoch_run_that_cannot_select_after_warmup_is_refused_naming_the_fix(name, mode, fix):
    with pytest.raises(InvalidArgument, match="select nothing") as err:
        plan(name, 1, mode)
    assert fix in str(err.value) and name in str(err.value)


def test_mrmc_without_the_scoring_point_needs_two_warmup_epochs_in_the_plan_too():
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert plan("mrmc", 4, scoring_point="off")["warmup_epochs"] == 2
    with pytest.raises(InvalidArgument, match="--epochs 4"):
        plan("mrmc", 3, scoring_point="off")


def test_an_explicit_warmup_below_the_run_is_left_alone():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan("dynams", 1, "online", warmup_epochs=0.25)["warmup_epochs"] == 0.25
        assert plan("dynams", 1, "subset", warmup_epochs=0)["warmup_epochs"] == 0
        assert plan("importance_sampling", 1, warmup_epochs=0)["warmup_epochs"] == 0


# -- MRMC's training-mode-only curves ------------------------------------------------------------

def test_mrmc_fits_training_mode_losses_alone_unless_the_warmup_has_one_epoch():
    # Reported (training-mode) losses 1.0, 0.5 at r = 1, 2 -> q = 2, w = 2, H = 2: φ = 2 (1 - 1/4) = 1.5,
    # whatever the (eval-mode) scoring pass says; with the scoring point (0.25 at r = 3) φ = 2 (1 - 1/8) = 1.75.
    ids = torch.tensor([7])
    for scoring_point, expect in (("auto", 1.5), ("off", 1.5), ("on", 1.75)):
        sel = make("mrmc", warmup_epochs=2, rho=1.0, scoring_point=scoring_point)
        for e, loss in enumerate((1.0, 0.5)):
            sel.on_report(Report(ids, torch.tensor([loss]), None, None, Progress(epoch=e)))
        out = sel.select(pool(ids, loss=torch.tensor([0.25]), features=torch.randn(1, 3)), 1, "topk")
        assert out.scores[0].item() == pytest.approx(expect, rel=1e-6)


# -- importance sampling: estimate once or keep updating --------------------------------------------

def test_importance_sampling_running_estimate_keeps_following_reports():
    sel = make("importance_sampling", warmup_epochs=1, momentum=0.0, epsilon=0.0, estimate="running")
    ids = torch.arange(2)
    sel.on_report(Report(ids, torch.zeros(2), torch.tensor([0.0, 1.0]), None, Progress(epoch=0)))
    sel.select(pool(ids, progress=Progress(epoch=1)), 2, "topk")
    sel.on_report(Report(ids, torch.zeros(2), torch.tensor([1.0, 0.0]), None, Progress(epoch=1)))
    assert sel.probabilities(ids).tolist() == [0.0, 1.0]
    assert not sel.frozen


# -- the threshold policy is variable-size for any score-based strategy --------------------------------

def test_threshold_policy_with_high_loss_through_a_scoring_session():
    """`--policy threshold` with high_loss used to end in INTERNAL: "selected 42 samples for a budget of 60"."""
    import torch.nn.functional as F

    from dataselect.scoring import PoolChunk, ScoringSession

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(120, 12, generator=g), torch.randint(0, 3, (120,), generator=g)
    session = ScoringSession("high_loss", {}, mlp, num_classes=3, seed=0, policy="threshold")
    session.load_state_dict(mlp.state_dict(), 1)
    result = session.select([PoolChunk(ids=torch.arange(120) + 500, labels=y, inputs=x)], 90)
    with torch.no_grad():
        losses = F.cross_entropy(mlp(x), y, reduction="none")
    above = torch.nonzero(losses >= losses.mean(), as_tuple=True)[0]
    assert 0 < above.numel() < 90  # the case that failed: fewer at or above the mean than the budget
    assert sorted(result.selected_ids.tolist()) == sorted((above + 500).tolist())
    # Above the budget, the highest scores fill it.
    capped = session.select([PoolChunk(ids=torch.arange(120) + 500, labels=y, inputs=x)], 5)
    assert set(capped.selected_ids.tolist()) == set((torch.topk(losses, 5).indices + 500).tolist())


@pytest.mark.parametrize("epochs,anneal,warns", [(1, 0.875, True), (2, 0.875, True), (3, 0.875, False),
                                                 (2, 1.0, False), (10, 0.875, False)])
def test_infobatch_warns_when_no_epoch_would_prune(epochs, anneal, warns):
    # Epoch 0 has no losses yet and epoch e prunes while e + 1 <= anneal·E: E = 2 at 0.875 (1.75) prunes nothing.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert plan("infobatch", epochs, anneal=anneal)["anneal"] == anneal
    assert bool(caught) == warns
    if warns:
        assert "--epochs 3" in str(caught[0].message) and "prunes nothing" in str(caught[0].message)
