"""Third-party plugins: entry-point loading and its failures, allow/deny lists,
models from plugins through a real server, isolation of broken strategies,
the conformance kit on broken plugins, and the example package under examples/.

Every plugin here is defined in the test (fake entry points or
`register_plugin`), never taken from what happens to be installed.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import dataselect
from dataselect import plugins as registry
from dataselect.client.main import cli
from dataselect.client.remote import RemoteScorer
from dataselect.client.scorer import EmbeddedScorer, SessionSpec
from dataselect.errors import DataselectError, InvalidArgument, PluginError
from dataselect.models import Classifier, build_model
from dataselect.registry import (
    _reset_for_tests,
    get_strategy,
    models,
    plugins,
    register_plugin,
    strategies,
    unregister_plugin,
)
from dataselect.plugins.base import Pool, Progress, Selection, Strategy
from dataselect.scoring import PoolChunk, ScoringSession
from dataselect.testing import CHECKS, check_strategy, run_checks

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "dataselect-el2n"

# -- fake entry points -----------------------------------------------------------------------

FAKE_MODULES = {
    "dstest_good": """
        import dataselect
        from dataselect.plugins.base import Strategy

        class Good(Strategy):
            name = "test_ep_good"
            description = "from a fake entry point"
            signals = frozenset({"loss"})

            def score(self, pool):
                return pool.signals["loss"]

        @dataselect.hookimpl
        def register_strategies(register):
            register(Good)
    """,
    "dstest_import_error": """
        raise RuntimeError("boom while importing")
    """,
    "dstest_misspelt": """
        import dataselect

        @dataselect.hookimpl
        def register_strategie(register):  # missing "s"
            pass
    """,
    "dstest_clash": """
        import dataselect
        from dataselect.plugins.base import Strategy

        class Clash(Strategy):
            name = "high_loss"  # taken by the built-ins
            description = "clashes"

        @dataselect.hookimpl
        def register_strategies(register):
            register(Clash)
    """,
}

FAKE_ENTRY_POINTS = {
    "good": "dstest_good",
    "import-error": "dstest_import_error",
    "missing": "dstest_no_such_module",
    "misspelt": "dstest_misspelt",
    "clash": "dstest_clash",
}


@pytest.fixture
def fake_entry_points(tmp_path, monkeypatch):
    """Entry points in the `dataselect` group pointing at modules written into tmp_path."""
    for mod, source in FAKE_MODULES.items():
        (tmp_path / f"{mod}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [md.EntryPoint(name=n, value=v, group=registry.ENTRY_POINT_GROUP) for n, v in FAKE_ENTRY_POINTS.items()]

    def entry_points(**params):
        return [ep for ep in eps if params.get("group") == ep.group]

    monkeypatch.setattr(md, "entry_points", entry_points)
    try:
        yield _reset_for_tests
    finally:
        monkeypatch.undo()
        for mod in FAKE_MODULES:
            sys.modules.pop(mod, None)
        _reset_for_tests()


def _rows():
    return {row["name"]: row for row in plugins()}


def test_a_plugin_that_fails_to_import_is_reported_and_the_rest_load(fake_entry_points):
    fake_entry_points()
    rows = _rows()
    assert strategies()["test_ep_good"].plugin == "good"
    assert rows["good"]["error"] is None and rows["good"]["hooks"] == ["register_strategies"]
    assert "import-error" in rows["import-error"]["error"]
    assert "RuntimeError: boom while importing" in rows["import-error"]["error"]
    assert "'missing'" in rows["missing"]["error"] and "ModuleNotFoundError" in rows["missing"]["error"]
    # built-ins are untouched, and the clash did not replace high_loss
    assert strategies()["high_loss"].plugin == "dataselect.plugins.builtin_strategies"
    assert "registered twice" in rows["clash"]["error"] and "'clash'" in rows["clash"]["error"]
    # `dataselect plugins` shows the same, and exits 0
    out = CliRunner().invoke(cli, ["plugins"])
    assert out.exit_code == 0, out.output
    line = next(l for l in out.output.splitlines() if l.startswith("import-error"))
    assert "ERROR:" in line and "boom while importing" in line
    # asking for a strategy that is not there points at the failures
    with pytest.raises(InvalidArgument, match="failed to load.*boom while importing"):
        get_strategy("test_ep_missing")


def test_a_misspelt_hook_in_an_entry_point_plugin_names_the_hook_and_the_plugin(fake_entry_points):
    fake_entry_points()
    err = _rows()["misspelt"]["error"]
    assert "plugin 'misspelt'" in err
    assert "unknown hook 'register_strategie'" in err and "did you mean 'register_strategies'" in err
    assert pm_has_no("misspelt")


def pm_has_no(name: str) -> bool:
    return registry.pm.get_plugin(name) is None


def test_allowlist_and_denylist(fake_entry_points, monkeypatch):
    monkeypatch.setenv("DATASELECT_PLUGINS", "good")
    fake_entry_points()
    assert set(_rows()) == set(registry.DEFAULT_PLUGINS) | {"good"}
    assert "test_ep_good" in strategies() and "high_loss" in strategies()

    monkeypatch.setenv("DATASELECT_PLUGINS", "")  # nothing third-party; built-ins always load
    fake_entry_points()
    assert set(_rows()) == set(registry.DEFAULT_PLUGINS)
    assert "test_ep_good" not in strategies() and "high_loss" in strategies() and "cnn-small" in models()

    monkeypatch.delenv("DATASELECT_PLUGINS")
    monkeypatch.setenv("DATASELECT_PLUGINS_DENY", "good, import-error")
    fake_entry_points()
    rows = _rows()
    assert "good" not in rows and "import-error" not in rows and "missing" in rows
    assert "test_ep_good" not in strategies()


def test_reset_keeps_runtime_plugins(fake_entry_points):
    class P:
        @dataselect.hookimpl
        def register_strategies(self, register):
            register(_Raises)

    register_plugin(P(), "runtime-kept")
    try:
        fake_entry_points()
        assert "test_raises" in strategies() and "test_ep_good" in strategies()
    finally:
        unregister_plugin("runtime-kept")
    assert "test_raises" not in strategies()


def test_register_plugin_names_a_misspelt_hook():
    class Misspelt:
        @dataselect.hookimpl
        def register_model(self, register):
            pass

    with pytest.raises(PluginError, match="plugin 'oops'.*unknown hook 'register_model'.*did you mean 'register_models'"):
        register_plugin(Misspelt(), "oops")
    assert pm_has_no("oops")


def test_a_hook_with_unknown_arguments_is_refused():
    class WrongArgs:
        @dataselect.hookimpl
        def register_strategies(self, register, colour):
            pass

    with pytest.raises(PluginError, match="plugin 'wrong-args'.*colour"):
        register_plugin(WrongArgs(), "wrong-args")
    assert pm_has_no("wrong-args")


# -- register_models through a real server ---------------------------------------------------------

class TinyNet(Classifier):
    """A one-hidden-layer net registered by a test plugin."""

    def __init__(self, num_classes=10, in_channels=1, image_size=28, mean=(0.5,), std=(0.5,), hidden=16):
        super().__init__(mean, std)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden), nn.Tanh())
        self.classifier = nn.Linear(hidden, num_classes)

    def body(self, x):
        return self.net(x)


class _ModelPlugin:
    @dataselect.hookimpl
    def register_models(self, register):
        register("test-tiny-net", TinyNet)


KWARGS = dict(num_classes=10, in_channels=1, image_size=28, mean=(0.1307,), std=(0.3081,))


def _pool(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(500, 500 + n, dtype=torch.int64)
    inputs = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), dtype=torch.int64, generator=g)
    return ids, inputs, labels


def _spec(strategy: str, model: str = "mlp") -> SessionSpec:
    return SessionSpec(strategy=strategy, options={}, model_name=model, model_kwargs=dict(KWARGS),
                       num_classes=10, seed=3, dataset="test", dataset_size=1000)


def test_a_plugin_model_is_built_by_the_server(server):
    with pytest.raises(InvalidArgument, match="has no model 'test-tiny-net'"):
        RemoteScorer(server.address, _spec("high_loss", "test-tiny-net"), retry_seconds=0)
    register_plugin(_ModelPlugin(), "model-plugin")
    try:
        assert models()["test-tiny-net"].plugin == "model-plugin"
        torch.manual_seed(0)
        model = build_model("test-tiny-net", **KWARGS).eval()
        ids, inputs, labels = _pool(40)
        with RemoteScorer(server.address, _spec("high_loss", "test-tiny-net"), retry_seconds=0) as remote:
            remote.push_checkpoint(model, version=1, step=0)
            reply = remote.select(ids, inputs, labels, 8, Progress())
            session = server.store.get(remote.info.session_id)
            assert isinstance(session.model, TinyNet)
        with torch.no_grad():
            losses = F.cross_entropy(model(inputs), labels, reduction="none")
        assert set(reply.selected_ids.tolist()) == set(ids[losses.topk(8).indices].tolist())
    finally:
        unregister_plugin("model-plugin")
    assert "test-tiny-net" not in models()


# -- isolation: broken strategies ------------------------------------------------------------------------

class _Raises(Strategy):
    name = "test_raises"
    description = "score() raises"
    signals = frozenset({"loss"})

    def score(self, pool: Pool) -> torch.Tensor:
        raise ValueError("kaboom in the plugin")


class _WrongShape(Strategy):
    name = "test_wrong_shape"
    description = "score() returns one score too few"
    signals = frozenset({"loss"})

    def score(self, pool: Pool) -> torch.Tensor:
        return pool.signals["loss"][:-1]


class _WrongShape2D(Strategy):
    name = "test_wrong_shape_2d"
    description = "score() returns the probabilities instead of one score per sample"
    default_policy = "class_balanced"
    signals = frozenset({"probs"})

    def score(self, pool: Pool) -> torch.Tensor:
        return pool.signals["probs"]


class _NaN(Strategy):
    name = "test_nan"
    description = "score() returns NaN"
    signals = frozenset({"loss"})

    def score(self, pool: Pool) -> torch.Tensor:
        s = pool.signals["loss"].clone()
        s[0] = float("nan")
        return s


class _BadSelect(Strategy):
    name = "test_bad_select"
    description = "select() returns positions beyond the pool and scores of the wrong length"

    def select(self, pool: Pool, budget: int, policy: str) -> Selection:
        return Selection(indices=torch.arange(budget) + len(pool), scores=torch.zeros(3))


class _BadScoresFromSelect(Strategy):
    name = "test_bad_select_scores"
    description = "select() returns valid positions but scores of the wrong length"

    def select(self, pool: Pool, budget: int, policy: str) -> Selection:
        return Selection(indices=torch.arange(budget), scores=torch.zeros(len(pool) + 1))


#: strategy -> what its error message must say (a regular expression)
BROKEN = {
    "test_raises": r"raised ValueError: kaboom in the plugin",
    "test_wrong_shape": r"score\(\) returned shape \[(\d+)\] for a pool of \d+",
    "test_wrong_shape_2d": r"score\(\) returned shape \[\d+, \d+\] for a pool of \d+",
    "test_nan": r"score\(\) returned NaN",
    "test_bad_select": r"positions outside \[0, \d+\)",
    "test_bad_select_scores": r"returned \d+ scores for a pool of \d+",
}


class _BrokenPlugin:
    @dataselect.hookimpl
    def register_strategies(self, register):
        for cls in (_Raises, _WrongShape, _WrongShape2D, _NaN, _BadSelect, _BadScoresFromSelect):
            register(cls)


@pytest.fixture
def broken_plugin():
    register_plugin(_BrokenPlugin(), "broken-plugin")
    try:
        yield
    finally:
        unregister_plugin("broken-plugin")


@pytest.mark.parametrize("strategy", sorted(BROKEN))
def test_broken_strategy_gives_the_trainer_a_clear_error_and_the_server_stays_up(server, broken_plugin, strategy):
    torch.manual_seed(0)
    model = build_model("mlp", **KWARGS).eval()
    ids, inputs, labels = _pool(16)
    with RemoteScorer(server.address, _spec(strategy), retry_seconds=0) as remote:
        remote.push_checkpoint(model, version=1, step=0)
        with pytest.raises(DataselectError) as info:
            remote.select(ids, inputs, labels, 4, Progress())
    message = str(info.value)
    assert f"strategy {strategy!r} (plugin 'broken-plugin')" in message, message
    assert re.search(BROKEN[strategy], message), message
    assert "IndexError" not in message
    # in-process, the same words (one label, made where the strategy is loaded)
    embedded = EmbeddedScorer(_spec(strategy))
    embedded.push_checkpoint(model, version=1, step=0)
    with pytest.raises(DataselectError) as local:
        embedded.select(ids, inputs, labels, 4, Progress())
    assert f"strategy {strategy!r} (plugin 'broken-plugin')" in str(local.value), str(local.value)
    # the server is still up and scores for a sound strategy
    with RemoteScorer(server.address, _spec("high_loss"), retry_seconds=0) as remote:
        remote.push_checkpoint(model, version=1, step=0)
        assert remote.select(ids, inputs, labels, 4, Progress()).selected_ids.numel() == 4


@pytest.mark.parametrize("strategy", sorted(BROKEN))
def test_conformance_kit_catches_broken_strategies(broken_plugin, strategy):
    results = {r.check: r for r in run_checks(strategy)}
    assert set(results) == set(CHECKS)
    failed = results["budget and ids"]
    assert not failed.ok and strategy in failed.message and re.search(BROKEN[strategy], failed.message)
    assert "crashed" not in failed.message  # a PluginError, reported as such, not an unexpected crash
    with pytest.raises(AssertionError, match=strategy):
        check_strategy(strategy)


def test_conformance_command_prints_fail_lines_and_exits_nonzero(broken_plugin, capsys):
    from dataselect.testing import main

    assert main(["test_nan", "high_loss"]) == 1
    out = capsys.readouterr().out
    assert "test_nan: from plugin broken-plugin" in out
    assert "FAIL test_nan: budget and ids" in out and "NaN" in out
    assert "ok   high_loss: budget and ids" in out
    assert f"{2 * len(CHECKS) - sum(1 for l in out.splitlines() if l.startswith('FAIL'))} passed" in out


# -- the example package, registered in-process ----------------------------------------------------------

@pytest.fixture(scope="module")
def example_plugin():
    spec = importlib.util.spec_from_file_location("dataselect_el2n_example",
                                                  EXAMPLE / "dataselect_el2n" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    register_plugin(module, "el2n-example")
    try:
        yield module
    finally:
        unregister_plugin("el2n-example")


@pytest.mark.parametrize("name", ["el2n", "forgetting"])
def test_example_strategies_conform(example_plugin, name):
    check_strategy(name)


def test_example_el2n_matches_the_formula_through_a_session(example_plugin):
    session = ScoringSession("el2n", {}, "mlp", KWARGS, num_classes=10, seed=0)
    torch.manual_seed(1)
    model = build_model("mlp", **KWARGS).eval()
    session.load_state_dict(model.state_dict(), version=1)
    ids, inputs, labels = _pool(32, seed=4)
    result = session.select([PoolChunk(ids, labels, inputs)], 5, return_scores=True)
    with torch.no_grad():
        p = F.softmax(model(inputs), dim=1)
    expected = (p - F.one_hot(labels, 10).float()).norm(dim=1)
    assert torch.allclose(result.scores, expected, atol=1e-5)
    assert set(result.selected_ids.tolist()) == set(ids[expected.topk(5).indices].tolist())


def test_example_forgetting_prefers_forgotten_samples(example_plugin):
    session = ScoringSession("forgetting", {}, "mlp", KWARGS, num_classes=10, seed=0)
    ids = torch.arange(6, dtype=torch.int64)
    zeros = torch.zeros(6)
    # 0,1: learned then forgotten twice; 2,3: learned, never forgotten; 4,5: never learned
    for correct in ([1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]):
        session.report(ids, zeros, None, torch.tensor(correct, dtype=torch.bool), Progress())
    labels = torch.zeros(6, dtype=torch.long)
    pick = lambda k: set(session.select([PoolChunk(ids, labels, None)], k).selected_ids.tolist())  # noqa: E731
    assert pick(2) == {4, 5}
    assert pick(4) == {0, 1, 4, 5}
