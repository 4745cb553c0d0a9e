"""Auxiliary losses: a strategy asks the trainer to add a loss term of its own, found by name through the
`register_auxiliary_losses` hook (DynaMS's parameter-sharing proxy is the built-in one, `slim_proxy`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dataselect
from dataselect.client.remote import auxiliary_loss_from_reply
from dataselect.client.session import weighted_loss
from dataselect.errors import InvalidArgument
from dataselect.registry import auxiliary_losses, get_auxiliary_loss, register_plugin, unregister_plugin
from dataselect.strategy import AuxiliaryLoss, Pool, Strategy
from dataselect.v1 import selection_pb2 as pb

WEIGHT, SCALE = 0.3, 2.0


def logit_l2(module, *, model_name, model_kwargs, params, device):
    """A test term: `scale` times each sample's mean squared logit."""
    def term(model, inputs, targets):
        return params["scale"] * model(inputs).pow(2).mean(1)
    return term


class WithPenalty(Strategy):
    name = "test_with_penalty"
    description = "high loss first, and asks the trainer for a logit penalty"
    signals = frozenset({"loss"})
    auxiliary_loss = AuxiliaryLoss("test_logit_l2", WEIGHT, {"scale": SCALE})

    def score(self, pool: Pool) -> torch.Tensor:
        return pool.signals["loss"]


class AsksForTheUnknown(WithPenalty):
    name = "test_unknown_aux"
    auxiliary_loss = AuxiliaryLoss("no_such_aux_loss")


class Plugin:
    @dataselect.hookimpl
    def register_strategies(self, register):
        register(WithPenalty)
        register(AsksForTheUnknown)

    @dataselect.hookimpl
    def register_auxiliary_losses(self, register):
        register("test_logit_l2", logit_l2)


@pytest.fixture
def plugin():
    register_plugin(Plugin(), "aux-plugin")
    yield
    unregister_plugin("aux-plugin")


def _data(n=256):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (n,), generator=g)
    return torch.randn(n, 20, generator=g) + y[:, None].float(), y


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("where", ["embedded", "remote"])
def test_the_trainer_adds_the_term_a_strategy_asks_for(plugin, server, where):
    x, y = _data()
    model = _model()
    address = server.address if where == "remote" else None
    session = dataselect.Session("test_with_penalty", model, epochs=1, server=address)
    loader = session.loader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    with session:
        bx, by = next(iter(loader))  # the session opens with the loader's first pool
        assert session.auxiliary == AuxiliaryLoss("test_logit_l2", WEIGHT, {"scale": SCALE})
        logits = model(bx)
        got = session.loss(logits, by)
        w = session.current.weights
        main = weighted_loss(F.cross_entropy(logits, by, reduction="none"), w)
        assert torch.allclose(got, main + WEIGHT * weighted_loss(SCALE * logits.pow(2).mean(1), w), atol=1e-6)
        assert float((got - main).detach()) > 0.0


def test_an_unknown_auxiliary_loss_is_refused_naming_the_known_ones(plugin):
    assert {"slim_proxy", "test_logit_l2"} <= set(auxiliary_losses())
    with pytest.raises(InvalidArgument, match=r"no_such_aux_loss.*known auxiliary losses: .*slim_proxy"):
        get_auxiliary_loss("no_such_aux_loss")
    session = dataselect.Session("test_unknown_aux", _model(), epochs=1)
    loader = session.loader(torch.utils.data.TensorDataset(*_data()), batch_size=32)
    with pytest.raises(InvalidArgument, match=r"test_unknown_aux.*no_such_aux_loss.*known auxiliary losses: .*slim_proxy"):
        with session:
            next(iter(loader))


def test_a_0_1_servers_proxy_reply_still_trains_the_slim_proxy():
    old = pb.OpenSessionResponse(session_id="s", proxy=pb.ProxySpec(width_ratio=0.25, loss_weight=0.5))
    assert auxiliary_loss_from_reply(old) == AuxiliaryLoss("slim_proxy", 0.5, {"width_ratio": 0.25})
    new = pb.OpenSessionResponse(session_id="s", auxiliary_loss=pb.AuxiliaryLoss(
        name="test_logit_l2", weight=0.3, params_json='{"scale": 2.0}'))
    assert auxiliary_loss_from_reply(new) == AuxiliaryLoss("test_logit_l2", 0.3, {"scale": 2.0})
    assert auxiliary_loss_from_reply(pb.OpenSessionResponse(session_id="s")) is None
