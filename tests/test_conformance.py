"""The conformance kit passes every registered strategy and catches broken ones."""

import subprocess
import sys

import pytest
import torch

import dataselect
from dataselect.registry import register_plugin, strategies, unregister_plugin
from dataselect.plugins.base import Pool, Selection, Strategy
from dataselect.testing import CHECKS, ConformanceError, check_strategy, run_checks


@pytest.mark.parametrize("name", sorted(strategies()))
def test_every_registered_strategy_conforms(name):
    check_strategy(name)


class _OverBudget(Strategy):
    name = "test_over_budget"
    description = "selects one sample too many"

    def select(self, pool: Pool, budget: int, policy: str) -> Selection:
        return Selection(indices=torch.arange(min(budget + 1, len(pool))))


class _Unseeded(Strategy):
    name = "test_unseeded"
    description = "ignores the session's generator"

    def score(self, pool: Pool) -> torch.Tensor:
        return torch.rand(len(pool))  # global RNG: differs between sessions


class _Plugin:
    @dataselect.hookimpl
    def register_strategies(self, register):
        register(_OverBudget)
        register(_Unseeded)


@pytest.fixture
def broken_plugin():
    register_plugin(_Plugin(), "broken-test-plugin")
    try:
        yield
    finally:
        unregister_plugin("broken-test-plugin")


def test_kit_catches_a_broken_budget(broken_plugin):
    results = {r.check: r for r in run_checks("test_over_budget")}
    assert set(results) == set(CHECKS)
    assert not results["budget and ids"].ok
    assert "test_over_budget" in results["budget and ids"].message
    with pytest.raises(ConformanceError, match="budget"):
        check_strategy("test_over_budget")


def test_kit_catches_nondeterminism(broken_plugin):
    results = {r.check: r for r in run_checks("test_unseeded")}
    assert results["budget and ids"].ok
    assert not results["deterministic with a seed"].ok


def test_command_line_reports_and_exits_nonzero_on_unknown_strategy():
    ok = subprocess.run([sys.executable, "-m", "dataselect.testing", "high_loss"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert f"{len(CHECKS)} passed, 0 failed" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "dataselect.testing", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "unknown strategy 'nope'" in bad.stderr and "Traceback" not in bad.stderr
