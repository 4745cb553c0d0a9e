"""The examples run as users would run them: embedded, and on a server (which has no code for their models)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dataselect.server.app import serve

from test_datasets import make_imagefolder

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scoring_server():
    with serve(port=0, device="cpu", workers=2) as running:
        yield running


@pytest.mark.parametrize("strategy", ["high_loss", "infobatch", "high_gradient"])
def test_the_tabular_example_learns_with_each_kind_of_strategy(strategy):
    epochs = 3 if strategy == "infobatch" else 2  # InfoBatch prunes while epoch + 1 <= 0.875 * epochs
    result = _example("tabular_mlp").main(["--strategy", strategy, "--epochs", str(epochs)])
    assert result["scorer"] == "embedded"
    assert result["test_accuracy"] > 0.6  # five Gaussian classes, 10 % of the labels flipped
    if strategy in ("high_loss", "high_gradient"):
        assert result["samples_trained"] == epochs * 4000 // 2  # half of every candidate pool


def test_the_tabular_example_scores_on_a_server(scoring_server):
    result = _example("tabular_mlp").main(["--strategy", "high_gradient", "--epochs", "2",
                                           "--server", scoring_server.address])
    assert result["scorer"] == "remote" and result["test_accuracy"] > 0.6


@pytest.mark.slow
@pytest.mark.parametrize("remote", [False, True])
def test_the_resnet_example_trains_an_unmodified_resnet18_on_an_imagefolder(tmp_path, scoring_server, remote):
    root = make_imagefolder(tmp_path / "colours", n_train=8, n_test=2)
    argv = ["--data", str(root), "--epochs", "1", "--batch-size", "8", "--size", "24", "--workers", "0"]
    result = _example("resnet_imagefolder").main(argv + (["--server", scoring_server.address] if remote else []))
    assert result["scorer"] == ("remote" if remote else "embedded")
    assert result["samples_scored"] == 24
    # high_loss keeps half; on a server overlap's ramp keeps whole one-batch pools in the first steps
    assert result["samples_trained"] == (24 if remote else 12)
    assert 0.0 <= result["test_accuracy"] <= 1.0
