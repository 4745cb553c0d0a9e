"""Plugin registry: lookups, duplicate names, misspelt hooks, runtime plugins."""

import pytest
import torch

import dataselect
from dataselect.errors import InvalidArgument, PluginError
from dataselect.registry import (
    get_model_builder,
    get_strategy,
    models,
    plugins,
    register_plugin,
    strategies,
    unregister_plugin,
)
from dataselect.plugins.base import Option, Pool, Progress, Strategy


def test_builtins_registered_through_the_hook():
    regs = strategies()
    assert {"random", "high_loss"} <= set(regs)
    assert regs["high_loss"].plugin == "dataselect.plugins.builtin_strategies"
    assert regs["high_loss"].distribution == "dataselect"
    assert {"cnn-small", "cnn-deep", "mlp", "resnet18"} <= set(models())
    names = {p["name"] for p in plugins()}
    assert "dataselect.plugins.builtin_strategies" in names


def test_unknown_names_list_the_known_ones():
    with pytest.raises(InvalidArgument, match="known strategies: .*high_loss"):
        get_strategy("no_such_strategy")
    with pytest.raises(InvalidArgument, match="known models: .*cnn-small"):
        get_model_builder("no-such-model")


class _Dup(Strategy):
    name = "high_loss"
    description = "clashes with the built-in"


class _Fresh(Strategy):
    name = "test_fresh"
    description = "a runtime-registered strategy"
    signals = frozenset({"loss"})
    options = {"power": Option(float, 1.0, "exponent")}

    def score(self, pool: Pool) -> torch.Tensor:
        return pool.signals["loss"] ** self.opts["power"]


class _DupPlugin:
    @dataselect.hookimpl
    def register_strategies(self, register):
        register(_Dup)


class _FreshPlugin:
    @dataselect.hookimpl
    def register_strategies(self, register):
        register(_Fresh)


class _Misspelt:
    @dataselect.hookimpl
    def register_strategie(self, register):  # missing "s": must fail loudly
        register(_Fresh)


def test_duplicate_name_is_rejected_naming_both_plugins():
    with pytest.raises(InvalidArgument, match="registered twice.*builtin_strategies.*dup-plugin"):
        register_plugin(_DupPlugin(), "dup-plugin")
    # the registry is unchanged afterwards
    assert get_strategy("high_loss").__module__ == "dataselect.plugins.builtin_strategies"
    assert "dup-plugin" not in {p["name"] for p in plugins()}


def test_misspelt_hook_fails_at_load():
    with pytest.raises(PluginError, match="register_strategie"):
        register_plugin(_Misspelt(), "misspelt")
    assert "misspelt" not in {p["name"] for p in plugins()}


def test_runtime_plugin_registers_and_unregisters():
    try:
        register_plugin(_FreshPlugin(), "fresh-plugin")
        cls = get_strategy("test_fresh")
        sel = cls({"power": "2"})
        assert sel.opts == {"power": 2.0}
        pool = Pool(ids=torch.arange(3), labels=torch.zeros(3, dtype=torch.long),
                    signals={"loss": torch.tensor([1.0, 3.0, 2.0])}, progress=Progress())
        chosen = sel.select(pool, 2, "topk")
        assert chosen.indices.tolist() == [1, 2]
    finally:
        unregister_plugin("fresh-plugin")
    with pytest.raises(InvalidArgument):
        get_strategy("test_fresh")


def test_a_plugin_written_against_the_0_1_names_still_loads():
    """One word now (Strategy, register_strategies, get_strategy, strategies), and the 0.1 names still work:
    a Selector subclass registered through register_selectors is found by both lookups."""
    from dataselect.plugins import get_selector, selectors

    class Old(dataselect.Selector):
        name = "test_old_names"
        description = "written against dataselect 0.1"
        signals = frozenset({"loss"})

        def score(self, pool):
            return pool.signals["loss"]

    class OldPlugin:
        @dataselect.hookimpl
        def register_selectors(self, register):
            register(Old)

    assert dataselect.Selector is Strategy
    try:
        register_plugin(OldPlugin(), "old-names")
        assert get_strategy("test_old_names") is Old and get_selector("test_old_names") is Old
        assert selectors()["test_old_names"].plugin == "old-names" and "test_old_names" in strategies()
    finally:
        unregister_plugin("old-names")
    assert "test_old_names" not in strategies()


def test_options_are_validated():
    with pytest.raises(InvalidArgument, match="no option bogus; known options: power"):
        _Fresh({"bogus": 1})
    with pytest.raises(InvalidArgument, match="power='abc' is not a valid float"):
        _Fresh({"power": "abc"})
