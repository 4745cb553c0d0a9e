"""DynaMS's parameter-sharing proxy (dynams proxy=psp): the slim sub-network, its joint training,
its margins, its agreement with the full model, and its way through both transports."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dataselect.checkpoint import make_checkpoint
from dataselect.datasets import open_dataset
from dataselect.client.remote import RemoteScorer
from dataselect.client.scorer import EmbeddedScorer, SessionSpec
from dataselect.client.train import TrainConfig, train
from dataselect.engine import compute_signals
from dataselect.errors import InvalidArgument, PluginError
from dataselect.models import build_model
from dataselect.plugins import register_plugin, unregister_plugin
from dataselect.plugins.base import Pool, Progress, Selection, Strategy
from dataselect.plugins.hookspecs import hookimpl
from dataselect.proxy import (
    build_proxy,
    calibrate_batchnorm,
    copy_shared,
    proxy_logits,
    proxy_models,
    rank_correlation,
)
from dataselect.scoring import PoolChunk, ScoringSession
from dataselect.strategy import AuxiliaryLoss
from dataselect.server import serve
from dataselect.testing import check_strategy
from pools import random_pool

KWARGS = dict(num_classes=10, in_channels=1, image_size=28, mean=(0.1307,), std=(0.3081,))
SLIMMABLE = ("cnn-small", "cnn-deep", "mlp")


def _pool(n: int, seed: int = 1, start_id: int = 100):
    return random_pool(n, seed, start_id=start_id)


def _trained_looking(name: str, seed: int = 0):
    """A model with random weights and non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    model = build_model(name, **KWARGS)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _leading_mask(full_t: torch.Tensor, slim_t: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(full_t, dtype=torch.bool)
    mask[tuple(slice(0, s) for s in slim_t.shape)] = True
    return mask


# -- the slim sub-network ---------------------------------------------------------------------------

def test_builtin_slimmable_models():
    assert set(SLIMMABLE) <= set(proxy_models())
    assert "resnet18" not in proxy_models()
    slim = build_proxy("cnn-small", KWARGS, 0.5)
    assert (slim.conv[0].out_channels, slim.conv[3].out_channels, slim.fc[1].out_features) == (16, 32, 64)
    assert slim.classifier.out_features == 10


@pytest.mark.parametrize("name", SLIMMABLE)
def test_slim_model_is_the_sub_network_of_the_leading_channels(name):
    """Zeroing every weight outside the leading slices (and the dropped channels' batch-norm
    scale and shift) leaves the full model computing exactly the slim model's logits."""
    full = _trained_looking(name)
    slim = build_proxy(name, KWARGS, 0.5, full=full).eval()
    copy_shared(full, slim)
    masked = build_model(name, **KWARGS).eval()
    masked.load_state_dict(full.state_dict())
    slim_tensors = dict(slim.named_parameters())
    with torch.no_grad():
        for key, t in masked.named_parameters():
            if key == "classifier.bias":  # every output is kept
                continue
            t.mul_(_leading_mask(t, slim_tensors[key]))
    _, x, _ = _pool(16)
    with torch.no_grad():
        expected = masked(x)
        assert torch.allclose(slim(x), expected, atol=1e-5)
        assert torch.allclose(proxy_logits(full, slim.eval(), x), expected, atol=1e-5)
    # A real sub-network: the proxy differs from the full model.
    assert not torch.allclose(full(x), expected, atol=1e-3)


@pytest.mark.parametrize("name", SLIMMABLE)
def test_proxy_loss_gradients_reach_exactly_the_shared_entries(name):
    full = _trained_looking(name).train()
    slim = build_proxy(name, KWARGS, 0.5, full=full).train()
    stats_before = {k: v.clone() for k, v in full.named_buffers()}
    _, x, y = _pool(32)
    F.cross_entropy(proxy_logits(full, slim, x), y).backward()
    slim_params = dict(slim.named_parameters())
    for key, p in full.named_parameters():
        assert p.grad is not None, key
        inside = _leading_mask(p, slim_params[key])
        assert bool((p.grad[~inside] == 0).all()), f"{key}: gradient outside the shared slice"
        assert bool((p.grad[inside] != 0).any()), f"{key}: no gradient inside the shared slice"
    assert all(p.grad is None for p in slim.parameters()), "the slim module's own parameters are not used"
    # The proxy's batch statistics stay in the slim module: the full model's are untouched.
    for key, v in full.named_buffers():
        assert torch.equal(v, stats_before[key]), key


@pytest.mark.parametrize("joint", [True, False])
def test_joint_training_trains_the_proxy(joint):
    """With the proxy's loss term its sub-network learns the batch; training the full model alone does not teach it."""
    data = open_dataset("synthetic", None, train_subset=128, test_subset=10)
    x, y = data.train_tensors.inputs, data.train_tensors.labels
    full = _trained_looking("cnn-small").train()
    slim = build_proxy("cnn-small", KWARGS, 0.5, full=full).train()
    opt = torch.optim.Adam(full.parameters(), lr=2e-3)
    for _ in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(full(x), y)
        if joint:
            loss = loss + F.cross_entropy(proxy_logits(full, slim, x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        proxy_loss = float(F.cross_entropy(proxy_logits(full, slim, x), y))
    assert (proxy_loss < 0.2) if joint else (proxy_loss > 0.8)


def test_batchnorm_calibration_uses_the_batch_statistics():
    slim = build_proxy("cnn-deep", KWARGS, 0.5).eval()
    _, x, _ = _pool(64, seed=2)
    calibrate_batchnorm(slim, x)
    assert not slim.training
    first = slim.conv[1]
    with torch.no_grad():
        pre = slim.conv[0](slim.normalize(x))
    assert torch.allclose(first.running_mean, pre.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(first.running_var, pre.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    assert first.momentum == 0.1  # restored


# -- rank correlation --------------------------------------------------------------------------------

def test_rank_correlation_hand_cases():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    # b's ranks with the tie averaged: [1, 2, 3.5, 5, 3.5]; centred: [-2, -1, .5, 2, .5] against [-2, -1, 0, 1, 2]:
    # Σ = 4 + 1 + 0 + 2 + 1 = 8, norms √10 and √9.5.
    b = torch.tensor([5.0, 6.0, 7.0, 8.0, 7.0])
    assert rank_correlation(a, b) == pytest.approx(8 / math.sqrt(95), rel=1e-12)
    assert rank_correlation(a, a.exp() * 3) == pytest.approx(1.0)  # monotone, not linear
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert rank_correlation(a, torch.ones(5)) is None
    assert rank_correlation(a[:1], a[:1]) is None
    with pytest.raises(InvalidArgument, match="differ in number"):
        rank_correlation(a, a[:3])


# -- the scoring session -----------------------------------------------------------------------------

def test_session_margins_come_from_an_explicit_slim_model():
    full = _trained_looking("cnn-small")
    session = ScoringSession("dynams", {"proxy": "psp", "agreement_sample": 40}, "cnn-small", KWARGS, num_classes=10)
    session.load_checkpoint(make_checkpoint("cnn-small", KWARGS, full, version=1), version=1)
    ids, x, y = _pool(100)
    result = session.select([PoolChunk(ids[:70], y[:70], x[:70]), PoolChunk(ids[70:], y[70:], x[70:])], 25,
                            return_scores=True)
    # The slim model built by hand: half the channels and hidden units, the leading slices copied in.
    explicit = build_model("cnn-small", **KWARGS, width=16, hidden=64).eval()
    full_state = full.state_dict()
    explicit.load_state_dict({k: full_state[k][tuple(slice(0, s) for s in v.shape)]
                              for k, v in explicit.state_dict().items()})
    slim_margin = compute_signals(explicit, x, y, {"boundary_margin"})["boundary_margin"]
    assert torch.allclose(result.scores, -slim_margin, atol=1e-5)
    assert set(result.selected_ids.tolist()) == set(ids[slim_margin.topk(25, largest=False).indices].tolist())
    full_margin = compute_signals(full, x[:40], y[:40], {"boundary_margin"})["boundary_margin"]
    d = result.diagnostics
    assert d["proxy_rank_correlation"] == pytest.approx(rank_correlation(slim_margin[:40], full_margin), abs=1e-6)
    assert d["proxy_agreement_samples"] == 40 and d["proxy_width_ratio"] == 0.5
    assert 0.2 < d["proxy_flops_ratio"] < 0.35  # about width_ratio² for the convolutions
    # A new checkpoint reaches the proxy too.
    other = _trained_looking("cnn-small", seed=5)
    session.load_checkpoint(make_checkpoint("cnn-small", KWARGS, other, version=2), version=2)
    again = session.select([PoolChunk(ids, y, x)], 25, return_scores=True)
    assert not torch.allclose(again.scores, result.scores)


def test_batchnorm_proxy_scores_do_not_depend_on_how_the_pool_is_split():
    full = _trained_looking("cnn-deep")
    ids, x, y = _pool(300)
    scores = []
    for cut in (300, 10, 257):
        session = ScoringSession("dynams", {"proxy": "psp"}, "cnn-deep", KWARGS, num_classes=10, micro_batch=64)
        session.load_checkpoint(make_checkpoint("cnn-deep", KWARGS, full, version=1), version=1)
        chunks = [PoolChunk(ids[i:i + cut], y[i:i + cut], x[i:i + cut]) for i in range(0, 300, cut)]
        scores.append(session.select(chunks, 30, return_scores=True).scores)
    assert torch.allclose(scores[0], scores[1], atol=1e-5) and torch.allclose(scores[0], scores[2], atol=1e-5)


def test_psp_refused_for_a_model_without_a_sub_network():
    kw = dict(num_classes=10, in_channels=3, image_size=32, mean=(0.5,), std=(0.25,))
    with pytest.raises(InvalidArgument, match=r"model 'resnet18' has none .*cnn-deep, cnn-small, mlp.*proxy=none"):
        ScoringSession("dynams", {"proxy": "psp"}, "resnet18", kw, num_classes=10)


def test_psp_passes_the_conformance_kit():
    check_strategy("dynams", {"proxy": "psp"})
    check_strategy("dynams", {"proxy": "psp", "kind": "logit", "schedule": "power"})


class _Diagnosing(Strategy):
    name = "test-diagnosing"

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.bad = False

    def select(self, pool: Pool, budget: int, policy: str) -> Selection:
        value = torch.tensor(1.0) if self.bad else 0.25
        return Selection(indices=torch.arange(budget), diagnostics={"kept_fraction": value, "note": "hi"})


class _DiagnosingPlugin:
    @hookimpl
    def register_strategies(self, register):
        register(_Diagnosing)


def test_a_strategy_reports_its_own_diagnostics():
    register_plugin(_DiagnosingPlugin(), "diagnosing-plugin")
    try:
        session = ScoringSession("test-diagnosing", {}, "mlp", KWARGS, num_classes=10)
        ids, x, y = _pool(20)
        assert session.select([PoolChunk(ids, y, None)], 5).diagnostics == {"kept_fraction": 0.25, "note": "hi"}
        session.strategy_object.bad = True
        with pytest.raises(PluginError, match="diagnostics that are not plain JSON"):
            session.select([PoolChunk(ids, y, None)], 5)
    finally:
        unregister_plugin("diagnosing-plugin")


# -- both transports ---------------------------------------------------------------------------------

def _spec(options) -> SessionSpec:
    return SessionSpec(strategy="dynams", options=options, model_name="mlp", model_kwargs=dict(KWARGS),
                       num_classes=10, seed=3, dataset="test", dataset_size=1000)


def test_proxy_and_diagnostics_travel_over_a_real_server():
    model = _trained_looking("mlp")
    ids, x, y = _pool(200)
    options = {"proxy": "psp", "width_ratio": 0.25, "proxy_weight": 0.5}
    embedded = EmbeddedScorer(_spec(options))
    embedded.push_checkpoint(model, 1, 0)
    local = embedded.select(ids, x, y, 50, Progress())
    with serve(port=0, device="cpu", workers=2) as server:
        with RemoteScorer(server.address, _spec(options), retry_seconds=0) as remote:
            assert remote.info.auxiliary_loss == AuxiliaryLoss("slim_proxy", 0.5, {"width_ratio": 0.25})
            remote.push_checkpoint(model, 1, 0)
            reply = remote.select(ids, x, y, 50, Progress())
        with RemoteScorer(server.address, _spec({}), retry_seconds=0) as plain:
            assert plain.info.auxiliary_loss is None
            plain.push_checkpoint(model, 1, 0)
            assert plain.select(ids, x, y, 50, Progress()).diagnostics == {}
    assert reply.selected_ids.tolist() == local.selected_ids.tolist()
    assert reply.diagnostics["proxy_rank_correlation"] == pytest.approx(local.diagnostics["proxy_rank_correlation"])
    assert reply.diagnostics["proxy_width_ratio"] == 0.25 and reply.diagnostics["proxy_agreement_samples"] == 200


def test_training_with_the_proxy_end_to_end(tmp_path):
    cfg = dict(strategy="dynams", dataset="synthetic", device="cpu", epochs=2, train_subset=600, test_subset=200,
               progress=False, threads=1, micro_batch=256)
    summary = train(TrainConfig(**cfg, options={"proxy": "psp", "warmup_epochs": 0}, output=str(tmp_path)))
    assert summary["auxiliary_loss"] == {"name": "slim_proxy", "weight": 1.0, "params": {"width_ratio": 0.5}}
    per_epoch = [e["diagnostics"]["proxy_rank_correlation"] for e in summary["per_epoch"]]
    assert len(per_epoch) == 2 and all(-1.0 <= r <= 1.0 for r in per_epoch)
    assert summary["diagnostics"]["proxy_rank_correlation"] == pytest.approx(sum(per_epoch) / 2)
    assert summary["diagnostics_last"]["proxy_rank_correlation"] == pytest.approx(per_epoch[-1])
    assert summary["test_accuracy"] > 0.1 and summary["train_seconds"] > 0
    plain = train(TrainConfig(**cfg))
    assert plain["auxiliary_loss"] is None and plain["diagnostics"] == {}
    assert "diagnostics" not in plain["per_epoch"][0]


def test_replicated_scorer_keeps_the_proxy_and_merges_diagnostics():
    from dataselect.client.replicas import ReplicatedScorer

    sp = _spec({"proxy": "psp", "agreement_sample": 30})
    scorer = ReplicatedScorer(["r0:1", "r1:2"], sp, connect=lambda address, retry, timeout: EmbeddedScorer(sp))
    assert scorer.info.auxiliary_loss == AuxiliaryLoss("slim_proxy", 1.0, {"width_ratio": 0.5})
    scorer.push_checkpoint(_trained_looking("mlp"), 1, 0)
    ids, x, y = _pool(120)
    reply = scorer.select(ids, x, y, 30, Progress())
    assert reply.diagnostics["proxy_agreement_samples"] == 30 and -1.0 <= reply.diagnostics["proxy_rank_correlation"] <= 1.0
    scorer.close()
