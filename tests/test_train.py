"""The training loop: it learns, it accounts its costs, it is reproducible."""

from __future__ import annotations

import json

import pytest
import torch

from dataselect.client.train import TrainConfig, format_cost_table, train, validate_config, weighted_loss
from dataselect.errors import DataselectError, InvalidArgument


def _config(tmp_path=None, **kw) -> TrainConfig:
    base = dict(dataset="synthetic", device="cpu", epochs=1, train_subset=1000, test_subset=300, progress=False)
    if tmp_path is not None:
        base["output"] = str(tmp_path)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def high_loss_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hl")
    summary = train(_config(out, epochs=2, train_subset=None, test_subset=None))
    return out, summary


def test_embedded_training_learns_and_accounts(high_loss_run):
    out, summary = high_loss_run
    assert summary["test_accuracy"] > 0.5  # chance is 0.1
    assert summary["train_seconds"] > 0 and summary["score_seconds"] > 0
    assert summary["server_compute_seconds"] > 0
    assert summary["score_seconds"] >= summary["server_compute_seconds"] * 0.99
    assert summary["samples_scored"] == 2 * 2000
    assert abs(summary["samples_trained"] - 0.5 * summary["samples_scored"]) <= summary["steps"]
    assert summary["checkpoint_pushes"] >= summary["steps"]  # sync_every=1, plus one before the first Select
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("strategy", "dataset", "model", "epochs", "test_accuracy", "wall_seconds", "train_seconds",
                "score_seconds", "server_compute_seconds", "transfer_seconds", "checkpoint_seconds",
                "eval_seconds", "data_seconds", "samples_trained", "samples_scored", "checkpoint_bytes",
                "checkpoint_pushes", "reconnects", "config", "device", "torch_version", "mode", "policy", "options"):
        assert key in on_disk, key
    assert on_disk["strategy"] == "high_loss" and on_disk["mode"] == "online" and on_disk["policy"] == "topk"
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1, 2]
    assert lines[1]["wall_seconds"] >= lines[0]["wall_seconds"]
    assert lines[0]["samples_scored"] == 2000 and "test_loss" in lines[0] and "score_seconds" in lines[0]
    assert (out / "checkpoint.pt").is_file() and not list(out.glob("*.tmp"))
    table = format_cost_table(summary)
    assert "waiting for selections" in table and "scoring compute in this process" in table
    assert "on the server" not in table and "hidden" not in table  # nothing remote or overlapped here
    full = summary["estimated_full_data_train_seconds"]
    assert full == pytest.approx(summary["train_seconds"] / summary["samples_trained"] * 2 * 2000)
    assert summary["estimated_saving_seconds"] == pytest.approx(
        full - summary["train_seconds"] - summary["score_seconds"] - summary["report_seconds"]
        - summary["checkpoint_seconds"])
    assert "estimate: training on every sample" in table


def test_final_checkpoint_restores_the_model(high_loss_run, tmp_path):
    out, summary = high_loss_run
    again = train(_config(tmp_path, select_fraction=1.0, init_from=str(out / "checkpoint.pt"),
                          train_subset=64, test_subset=None, lr=1e-6))
    assert abs(again["test_accuracy"] - summary["test_accuracy"]) < 0.02


def test_same_seed_same_selections_and_accuracy():
    a, b = train(_config(seed=3)), train(_config(seed=3))
    c = train(_config(seed=4))
    assert a["selection_sha256"] == b["selection_sha256"]
    assert a["test_accuracy"] == b["test_accuracy"] and a["test_loss"] == b["test_loss"]
    assert a["selection_sha256"] != c["selection_sha256"]


def test_full_data_baseline_scores_nothing():
    s = train(_config(select_fraction=1.0, strategy="random"))
    assert s["samples_scored"] == 0 and s["score_seconds"] == 0 and s["checkpoint_pushes"] == 0
    assert s["samples_trained"] == 1000 and s["full_data"]


def test_strategy_without_signals_gets_no_checkpoint_pushes():
    s = train(_config(strategy="random", select_fraction=0.25))
    assert s["checkpoint_pushes"] == 0 and s["samples_scored"] == 1000
    assert s["samples_trained"] == 250


def test_weighted_loss_applies_weights():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert weighted_loss(losses, None) == pytest.approx(2.5)
    assert weighted_loss(losses, torch.ones(4)) == pytest.approx(2.5)
    # Multipliers, not renormalised: zero weight drops a sample, 2x doubles its pull.
    assert weighted_loss(losses, torch.tensor([0.0, 0.0, 0.0, 2.0])) == pytest.approx(2.0)
    with pytest.raises(InvalidArgument):
        weighted_loss(losses, torch.ones(3))


def test_returned_weights_reach_the_gradient(monkeypatch):
    """A scorer that returns zero weights must leave the model unchanged."""
    from dataselect.client import scorer as scorer_mod

    real_select = scorer_mod.EmbeddedScorer.select

    def zero_weights(self, *args, **kwargs):
        reply = real_select(self, *args, **kwargs)
        reply.weights = torch.zeros(reply.selected_ids.shape[0])
        return reply

    monkeypatch.setattr(scorer_mod.EmbeddedScorer, "select", zero_weights)
    s = train(_config(train_subset=256, momentum=0.0))
    baseline = train(_config(train_subset=256, epochs=1, lr=1e-12, momentum=0.0))
    assert s["test_loss"] == pytest.approx(baseline["test_loss"], abs=1e-6)


@pytest.mark.parametrize("kw, match", [
    (dict(strategy="no_such"), "unknown strategy"),
    (dict(mode="sideways"), "--mode: 'sideways' is not one of"),
    (dict(budget_seconds=0.0), "budget-seconds"),
    (dict(budget_samples=0), "budget-samples"),
    (dict(select_fraction=0.0), "select-fraction"),
    (dict(model="no_such_model"), "unknown model"),
    (dict(policy="nope"), "unknown policy"),
])
def test_config_errors_before_any_data(kw, match):
    with pytest.raises(DataselectError, match=match):
        validate_config(_config(**kw))


def test_init_from_a_mismatched_checkpoint(high_loss_run):
    out, _ = high_loss_run
    with pytest.raises(InvalidArgument, match="--model cnn-small"):
        train(_config(model="mlp", init_from=str(out / "checkpoint.pt")))
