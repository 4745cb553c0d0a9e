"""Plugin registry: lookups, duplicate names, misspelt hooks, runtime plugins."""

import pytest
import torch

import dataselect
from dataselect.errors import InvalidArgument, PluginError
from dataselect.plugins import (
    get_model_builder,
    get_selector,
    models,
    plugins,
    register_plugin,
    selectors,
    unregister_plugin,
)
from dataselect.plugins.base import Option, Pool, Progress, Selector


def test_builtins_registered_through_the_hook():
    regs = selectors()
    assert {"random", "high_loss"} <= set(regs)
    assert regs["high_loss"].plugin == "dataselect.plugins.builtin_selectors"
    assert regs["high_loss"].distribution == "dataselect"
    assert {"cnn-small", "cnn-deep", "mlp", "resnet18"} <= set(models())
    names = {p["name"] for p in plugins()}
    assert "dataselect.plugins.builtin_selectors" in names


def test_unknown_names_list_the_known_ones():
    with pytest.raises(InvalidArgument, match="known strategies: .*high_loss"):
        get_selector("no_such_strategy")
    with pytest.raises(InvalidArgument, match="known models: .*cnn-small"):
        get_model_builder("no-such-model")


class _Dup(Selector):
    name = "high_loss"
    description = "clashes with the built-in"


class _Fresh(Selector):
    name = "test_fresh"
    description = "a runtime-registered strategy"
    signals = frozenset({"loss"})
    options = {"power": Option(float, 1.0, "exponent")}

    def score(self, pool: Pool) -> torch.Tensor:
        return pool.signals["loss"] ** self.opts["power"]


class _DupPlugin:
    @dataselect.hookimpl
    def register_selectors(self, register):
        register(_Dup)


class _FreshPlugin:
    @dataselect.hookimpl
    def register_selectors(self, register):
        register(_Fresh)


class _Misspelt:
    @dataselect.hookimpl
    def register_selector(self, register):  # missing "s": must fail loudly
        register(_Fresh)


def test_duplicate_name_is_rejected_naming_both_plugins():
    with pytest.raises(InvalidArgument, match="registered twice.*builtin_selectors.*dup-plugin"):
        register_plugin(_DupPlugin(), "dup-plugin")
    # the registry is unchanged afterwards
    assert get_selector("high_loss").__module__ == "dataselect.plugins.builtin_selectors"
    assert "dup-plugin" not in {p["name"] for p in plugins()}


def test_misspelt_hook_fails_at_load():
    with pytest.raises(PluginError, match="register_selector"):
        register_plugin(_Misspelt(), "misspelt")
    assert "misspelt" not in {p["name"] for p in plugins()}


def test_runtime_plugin_registers_and_unregisters():
    try:
        register_plugin(_FreshPlugin(), "fresh-plugin")
        cls = get_selector("test_fresh")
        sel = cls({"power": "2"})
        assert sel.opts == {"power": 2.0}
        pool = Pool(ids=torch.arange(3), labels=torch.zeros(3, dtype=torch.long),
                    signals={"loss": torch.tensor([1.0, 3.0, 2.0])}, progress=Progress())
        chosen = sel.select(pool, 2, "topk")
        assert chosen.indices.tolist() == [1, 2]
    finally:
        unregister_plugin("fresh-plugin")
    with pytest.raises(InvalidArgument):
        get_selector("test_fresh")


def test_options_are_validated():
    with pytest.raises(InvalidArgument, match="no option bogus; known options: power"):
        _Fresh({"bogus": 1})
    with pytest.raises(InvalidArgument, match="power='abc' is not a valid float"):
        _Fresh({"power": "abc"})
