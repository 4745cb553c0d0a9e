"""A model the server has no code for scores remotely: the session ships it as an exported program.

An unmodified torchvision ResNet-18 and a plain MLP of the user's own go to a server through
`torch.export` (`dataselect.exported`), are loaded there as data, and select what the
embedded session selects, last-layer signals included. The server refuses archives whose
name does not match their digest.
"""

from __future__ import annotations

import hashlib

import grpc
import pytest
import torch
from torch import nn

import dataselect
from dataselect.exported import export_model
from dataselect.server.app import serve
from dataselect.v1 import selection_pb2 as pb
from dataselect.v1 import selection_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def scoring_server():
    with serve(port=0, device="cpu", workers=2) as running:
        yield running


class Tabular(nn.Module):
    """A user's own model: not registered, no features()/classifier protocol."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 32), nn.ReLU())
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _selections(model, x, y, strategy, server=None):
    chosen = []
    with dataselect.Session(strategy, model, fraction=0.25, server=server, overlap=False, num_classes=None) as s:
        for start in range(0, len(x), 32):
            ids = torch.arange(start, start + 32)
            batch = s.select(x[start:start + 32], y[start:start + 32], ids)
            chosen.append(batch.ids.sort().values)
        label = s.scorer.spec.model_name if server else None
    return torch.cat(chosen), label


@pytest.mark.parametrize("strategy", ["high_loss", "high_gradient"])
def test_a_module_of_your_own_scores_on_a_server_as_it_does_embedded(scoring_server, strategy):
    torch.manual_seed(0)
    model = Tabular()
    x, y = torch.randn(96, 12), torch.randint(0, 3, (96,))
    embedded, _ = _selections(model, x, y, strategy)
    remote, label = _selections(model, x, y, strategy, scoring_server.address)
    assert label.startswith("exported:") and len(label) == len("exported:") + 12
    assert remote.tolist() == embedded.tolist()  # high_gradient: the last layer ("head") found on both sides


@pytest.mark.slow
def test_an_unmodified_torchvision_resnet18_trains_with_remote_selection(scoring_server):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with dataselect.Session("high_gradient", model, fraction=0.5, server=scoring_server.address, overlap=False,
                            num_classes=10) as session:
        for start in range(0, 64, 32):
            xs, ys = x[start:start + 32], y[start:start + 32]
            chosen = session.select(xs, ys, torch.arange(start, start + 32))
            assert len(chosen.ids) == 16
            loss = dataselect.weighted_loss(
                torch.nn.functional.cross_entropy(model(xs[chosen.rows]), ys[chosen.rows], reduction="none"),
                chosen.weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
            session.step()  # pushes the new weights: their keys are resnet18's own
        assert session.scorer.spec.model_name.startswith("exported:")
        assert session.checkpoint_version >= 2


def test_the_server_refuses_an_archive_under_another_name(scoring_server):
    torch.manual_seed(0)
    archive = export_model(Tabular(), torch.randn(2, 12))
    with grpc.insecure_channel(scoring_server.address) as channel:
        stub = pb_grpc.SelectionStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.OpenSession(pb.OpenSessionRequest(strategy="high_loss", num_classes=3, model=pb.ModelSpec(
                name="exported:000000000000", exported=archive)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert hashlib.sha256(archive).hexdigest()[:12] in err.value.details()
        ok = stub.OpenSession(pb.OpenSessionRequest(strategy="high_loss", num_classes=3, model=pb.ModelSpec(
            name=f"exported:{hashlib.sha256(archive).hexdigest()[:12]}", exported=archive)))
        assert ok.session_id
        with pytest.raises(grpc.RpcError) as err:  # a tampered archive is refused as data, not run
            bad = archive[:-40] + bytes(40)
            stub.OpenSession(pb.OpenSessionRequest(strategy="high_loss", num_classes=3, model=pb.ModelSpec(
                name=f"exported:{hashlib.sha256(bad).hexdigest()[:12]}", exported=bad)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.slow
def test_an_unmodified_resnet18_registered_by_a_plugin_selects_remotely_as_embedded(scoring_server):
    """Through a plugin the server builds resnet18 by name (no export); selections match the embedded ones."""
    torchvision = pytest.importorskip("torchvision")
    from dataselect.plugins.hookspecs import hookimpl
    from dataselect.plugins import register_plugin, unregister_plugin

    class Plugin:
        @hookimpl
        def register_models(self, register):
            register("tv-resnet18-remote-test", torchvision.models.resnet18)

    register_plugin(Plugin(), "tv-resnet18-remote-test-plugin")  # the in-process server shares the registry
    try:
        kw = dict(num_classes=10, in_channels=3, image_size=32, mean=[0.5] * 3, std=[0.25] * 3)
        torch.manual_seed(0)
        model = dataselect.build_model("tv-resnet18-remote-test", **kw)
        x, y = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (64,))
        embedded, _ = _selections(model, x, y, "high_gradient")
        remote, label = _selections(model, x, y, "high_gradient", scoring_server.address)
        assert label == "tv-resnet18-remote-test"  # built by name there, not exported
        assert remote.tolist() == embedded.tolist()
    finally:
        unregister_plugin("tv-resnet18-remote-test-plugin")
