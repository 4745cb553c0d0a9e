"""Any nn.Module that maps a batch to logits scores: unmodified torchvision models, tabular MLPs, models
whose last layer must be found by a trial forward, and the errors when it cannot be."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dataselect.engine import compute_signals
from dataselect.errors import InvalidArgument
from dataselect.models import ScoringModel, build_model
from dataselect.plugins import register_plugin, unregister_plugin
from dataselect.plugins.hookspecs import hookimpl
from dataselect.scoring import PoolChunk, ScoringSession


def _resnet18():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    return resnet18(num_classes=10).eval()


def _brute_force_last_layer_norms(model: nn.Module, layer: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """‖∇_{W,b} ℓ_i‖ of the final layer, one backward per sample."""
    norms = []
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        sq = layer.weight.grad.pow(2).sum() + (layer.bias.grad.pow(2).sum() if layer.bias is not None else 0.0)
        norms.append(sq.sqrt())
    return torch.stack(norms).detach()


def test_unmodified_torchvision_resnet18_last_layer_gradient_finds_fc_and_matches_brute_force():
    model = _resnet18()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    sm = ScoringModel(model)
    got = compute_signals(sm, x, y, {"grad_norm_last", "features", "loss"})
    assert sm.final_linear_name == "fc"
    expected = _brute_force_last_layer_norms(model, model.fc, x, y)
    assert torch.allclose(got["grad_norm_last"], expected, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        feats = torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))), 1)
    assert torch.allclose(got["features"], feats, atol=1e-5)
    assert torch.allclose(got["loss"], F.cross_entropy(model(x), y, reduction="none").detach(), atol=1e-5)


def test_a_session_scores_on_a_users_module_with_every_signal_kind():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 20, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    for strategy, options in (("high_loss", {}), ("high_gradient", {}), ("high_gradient", {"scope": "full"}),
                              ("high_influence", {}), ("dynams", {})):
        s = ScoringSession(strategy, options, mlp, num_classes=4, seed=0)
        s.load_state_dict(mlp.state_dict(), 1)
        res = s.select([PoolChunk(ids=torch.arange(40), labels=y, inputs=x)], 10, return_scores=True)
        assert res.selected_ids.numel() == 10, strategy
        assert torch.isfinite(res.scores).all()
    # high_loss picks exactly the ten largest losses of the user's own model
    s = ScoringSession("high_loss", {}, mlp, num_classes=4)
    s.load_state_dict(mlp.state_dict(), 1)
    res = s.select([PoolChunk(ids=torch.arange(40), labels=y, inputs=x)], 10)
    losses = F.cross_entropy(mlp(x), y, reduction="none").detach()
    assert set(res.selected_ids.tolist()) == set(torch.topk(losses, 10).indices.tolist())


class _ScaledHead(nn.Module):
    """The final Linear is followed by a scale: its output is not the model's output."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return 2.0 * self.head(torch.relu(self.body(x)))


def test_last_layer_signals_refuse_a_model_without_a_final_linear_naming_last_layer():
    model = _ScaledHead()
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    with pytest.raises(InvalidArgument, match="last_layer="):
        compute_signals(model, x, y, {"grad_norm_last"})
    with pytest.raises(InvalidArgument, match="its output is not the model's output"):
        compute_signals(ScoringModel(model, last_layer="head"), x, y, {"grad_norm_last"})
    with pytest.raises(InvalidArgument, match="body, head"):
        ScoringModel(model, last_layer="nope")
    # signals that need no last layer still work
    assert compute_signals(model, x, y, {"loss", "input_grad_norm"})["loss"].shape == (5,)


class _DenseNetLike(nn.Module):
    """Has `features` and a Linear `classifier`, but forward does more between them (as torchvision's DenseNet)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 12))
        self.classifier = nn.Linear(12, 3)

    def forward(self, x):
        return self.classifier(torch.relu(self.features(x)))


def test_features_come_from_the_real_input_of_the_final_layer_not_a_lookalike_protocol():
    torch.manual_seed(0)
    model = _DenseNetLike().eval()
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    got = compute_signals(ScoringModel(model), x, y, {"features"})
    assert torch.allclose(got["features"], torch.relu(model.features(x)).detach())


def test_a_registered_builder_without_mean_std_gets_normalised_images():
    from torchvision.models import resnet18

    class Plugin:
        @hookimpl
        def register_models(self, register):
            register("tv-resnet18-test", resnet18)

    register_plugin(Plugin(), "tv-resnet18-test-plugin")
    try:
        kw = dict(num_classes=10, in_channels=3, image_size=32, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
        model = build_model("tv-resnet18-test", **kw)
        x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        model.eval()
        expected = model.model((x.float() / 255 - 0.5) / 0.25)
        assert torch.allclose(model(x), expected, atol=1e-5)
        s = ScoringSession("high_gradient", {}, "tv-resnet18-test", kw, num_classes=10)
        s.load_state_dict(s.model.state_dict(), 1)
        res = s.select([PoolChunk(ids=torch.arange(8), labels=torch.randint(0, 10, (8,)),
                                  inputs=torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))], 3)
        assert res.selected_ids.numel() == 3
        assert s.scoring_model.final_linear_name == "model.fc"
        with pytest.raises(InvalidArgument, match="bad arguments"):
            build_model("tv-resnet18-test", **kw, widht=3)  # a misspelt argument is never dropped silently
    finally:
        unregister_plugin("tv-resnet18-test-plugin")


def test_a_registered_model_with_a_bad_argument_is_refused_at_open():
    kw = dict(num_classes=10, in_channels=1, image_size=28, mean=[0.5], std=[0.0])
    with pytest.raises(InvalidArgument, match="std must be > 0"):
        ScoringSession("high_loss", {}, "cnn-small", kw, num_classes=10)


def test_non_finite_signals_are_blamed_on_the_model_naming_samples():
    """Weights that are finite but overflow on some inputs give inf logits: the Select says the model
    diverged and which samples, rather than blaming the strategy for NaN scores."""
    from dataselect.errors import FailedPrecondition

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    s = ScoringSession("high_loss", {}, mlp, num_classes=3)
    state = {k: v.clone() for k, v in mlp.state_dict().items()}
    state["0.weight"] = torch.full_like(state["0.weight"], 1e20)  # finite, but the second layer overflows
    state["2.weight"] = torch.full_like(state["2.weight"], 1e20)
    s.load_state_dict(state, 3)
    x = torch.zeros(10, 6)
    x[4] = 1.0  # only this sample's activations reach 1e20 * 1e20 * 16
    with pytest.raises(FailedPrecondition, match=r"non-finite loss for 1 of 10 samples \(ids 104\) with checkpoint "
                                                 r"version 3.*lower the learning rate"):
        s.select([PoolChunk(ids=torch.arange(100, 110), labels=torch.zeros(10, dtype=torch.long), inputs=x)], 5)
