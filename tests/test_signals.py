"""The signals engine against brute force: single-sample autograd loops, eval mode."""

import pytest
import torch
import torch.nn.functional as F

from dataselect.engine import compute_signals
from dataselect.models import build_model

RTOL = 1e-4


def _model(name, seed=0):
    torch.manual_seed(seed)
    m = build_model(name, num_classes=10, in_channels=3, image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    if name == "resnet18":
        # Non-trivial running statistics, so eval mode is really exercised.
        m.train()
        with torch.no_grad():
            m(torch.rand(8, 3, 32, 32))
    return m.eval()


def _batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g)


def _rel(a, b):
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-12)).max())


def _brute(model, x, y, params_only_last=False, wrt_input=False):
    out = []
    xf = x.float() / 255.0
    for i in range(x.shape[0]):
        xi = xf[i:i + 1].clone().requires_grad_(wrt_input)
        loss = F.cross_entropy(model(xi), y[i:i + 1])
        if wrt_input:
            (g,) = torch.autograd.grad(loss, xi)
            out.append(g.norm())
        else:
            params = list(model.classifier.parameters()) if params_only_last else list(model.parameters())
            gs = torch.autograd.grad(loss, params)
            out.append(torch.sqrt(sum(g.pow(2).sum() for g in gs)))
    return torch.stack(out)


@pytest.mark.parametrize("name", ["cnn-small", "cnn-deep", "mlp", "resnet18"])
def test_gradient_norms_match_brute_force(name):
    model = _model(name)
    x, y = _batch()
    got = compute_signals(model, x, y, {"grad_norm_full", "grad_norm_last", "input_grad_norm"}, micro_batch=3)
    assert not model.training
    assert _rel(got["grad_norm_full"], _brute(model, x, y)) <= RTOL
    assert _rel(got["grad_norm_last"], _brute(model, x, y, params_only_last=True)) <= RTOL
    assert _rel(got["input_grad_norm"], _brute(model, x, y, wrt_input=True)) <= RTOL


def test_margins_match_direct_computation():
    model = _model("cnn-small")
    x, y = _batch(n=16)
    got = compute_signals(model, x, y, {"boundary_margin", "logit_margin", "features", "logits"})
    h, z = got["features"].double(), got["logits"].double()
    w, b = model.classifier.weight.detach().double(), model.classifier.bias.detach().double()
    for i in range(x.shape[0]):
        yi = int(y[i])
        dists = [((w[yi] - w[c]) @ h[i] + b[yi] - b[c]) / (w[yi] - w[c]).norm() for c in range(10) if c != yi]
        assert abs(float(min(dists)) - float(got["boundary_margin"][i])) <= RTOL * max(1.0, abs(float(min(dists))))
        lm = z[i, yi] - max(z[i, c] for c in range(10) if c != yi)
        assert abs(float(lm) - float(got["logit_margin"][i])) <= 1e-5
    # Signed: negative exactly where the sample is misclassified.
    wrong = z.argmax(1) != y
    assert torch.equal(got["boundary_margin"] < 0, wrong)


def test_forward_signals_consistent():
    model = _model("cnn-small")
    x, y = _batch(n=8)
    got = compute_signals(model, x, y, {"loss", "probs", "logits"}, micro_batch=3)
    with torch.no_grad():
        z = model(x)
    assert torch.allclose(got["logits"], z, atol=1e-5)
    assert torch.allclose(got["loss"], F.cross_entropy(z, y, reduction="none"), atol=1e-5)
    assert torch.allclose(got["probs"].sum(1), torch.ones(8), atol=1e-5)


@pytest.mark.parametrize("name", ["cnn-small", "resnet18"])
def test_closed_form_per_sample_norms_equal_torch_func(name):
    from dataselect.engine import _layerwise_modules, _per_sample_grad_norm_layerwise, _per_sample_grad_norm_vmap

    model = _model(name)
    x, y = _batch(n=5)
    owners = _layerwise_modules(model)
    assert owners is not None  # every built-in model takes the closed-form path
    closed = _per_sample_grad_norm_layerwise(model, owners, x, y)
    assert _rel(closed, _per_sample_grad_norm_vmap(model, x, y)) <= RTOL


def test_models_with_other_layers_fall_back_to_torch_func():
    from torch import nn

    from dataselect.engine import _layerwise_modules

    model = _model("cnn-small")
    model.conv[0] = nn.Conv2d(3, 32, 3, padding=1, groups=1)
    assert _layerwise_modules(model) is not None
    model.extra = nn.PReLU()  # a parameter the closed form does not know
    assert _layerwise_modules(model) is None
    model = _model("cnn-small")
    model.conv[3] = nn.Conv2d(32, 64, 3, padding=1, groups=2)  # grouped: no unfold formula here
    assert _layerwise_modules(model) is None
    x, y = _batch()
    got = compute_signals(model.eval(), x, y, {"grad_norm_full"})
    assert _rel(got["grad_norm_full"], _brute(model, x, y)) <= RTOL
