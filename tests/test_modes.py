"""Training modes (online with accumulation, subset, weighted), warm-up, reports and budgets.

A tiny strategy registered at run time (`_Recorder`) records every Select and
Report the trainer makes, so the tests check what was trained on, not just
that accuracy went up.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

import dataselect
from dataselect.client import session as session_mod
from dataselect.client.train import TrainConfig, train
from dataselect.plugins import register_plugin, unregister_plugin
from dataselect.plugins.base import Option, Pool, Report, Selection, Strategy

#: What the recorder saw in the current test: ("select"|"report", epoch, total_epochs, ids, weights).
EVENTS: list[tuple] = []


class _Recorder(Strategy):
    """Selects at random by `kind`: exact (a fixed-size subset), replace (draws with
    replacement, weights 1..3) or variable (1..budget samples); records every call."""

    name = "test_recorder"
    description = "records the trainer's calls (tests only)"
    default_mode = "subset"
    uses_reports = True
    options = {
        "kind": Option(str, "exact", choices=("exact", "replace", "variable")),
        "refresh": Option(int, 1, min=1),
        "warmup_epochs": Option(int, 0, min=0),
    }

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.exact_budget = self.opts["kind"] != "variable"
        self.with_replacement = self.opts["kind"] == "replace"

    def select(self, pool: Pool, budget: int, policy: str) -> Selection:
        g, n, kind = self.context.generator, len(pool), self.opts["kind"]
        weights = None
        if kind == "replace":
            idx = torch.randint(n, (budget,), generator=g)
            weights = torch.randint(1, 4, (budget,), generator=g).float()
        else:
            size = budget if kind == "exact" else int(torch.randint(1, budget + 1, (1,), generator=g))
            idx = torch.randperm(n, generator=g)[:size]
        EVENTS.append(("select", pool.progress.epoch, pool.progress.total_epochs, pool.ids[idx].clone(),
                       weights, n, budget))
        return Selection(indices=idx, weights=weights)

    def on_report(self, report: Report) -> None:
        ids, losses, true_class_probs, correct, progress = (report.ids, report.losses, report.true_class_probs,
                                                             report.correct, report.progress)
        assert losses.shape == ids.shape and true_class_probs.shape == ids.shape and correct.shape == ids.shape
        EVENTS.append(("report", progress.epoch, progress.total_epochs, ids.clone(), None))


class _RecorderPlugin:
    @dataselect.hookimpl
    def register_strategies(self, register):
        register(_Recorder)


@pytest.fixture
def recorder():
    EVENTS.clear()
    register_plugin(_RecorderPlugin(), "test-recorder-plugin")
    try:
        yield EVENTS
    finally:
        unregister_plugin("test-recorder-plugin")
        EVENTS.clear()


def _config(tmp_path=None, **kw) -> TrainConfig:
    base = dict(dataset="synthetic", device="cpu", epochs=2, train_subset=400, test_subset=200, batch_size=32,
                progress=False, threads=1)
    if tmp_path is not None:
        base["output"] = str(tmp_path)
    base.update(kw)
    return TrainConfig(**base)


def _of(events, kind):
    return [e for e in events if e[0] == kind]


@pytest.mark.parametrize("strategy, mode", [("high_loss", "online"), ("random", "subset"),
                                            ("importance_sampling", "weighted")])
def test_each_mode_learns(strategy, mode):
    options = {"warmup_epochs": 1} if strategy == "importance_sampling" else {}
    s = train(_config(strategy=strategy, mode=mode, options=options, epochs=3, train_subset=1000,
                      select_fraction=0.5))
    assert s["mode"] == mode
    assert s["test_accuracy"] > 0.4, s["test_accuracy"]  # chance is 0.1
    assert s["train_seconds"] > 0 and s["score_seconds"] > 0 and s["samples_trained"] > 0


def test_subset_trains_only_on_selected_ids_and_refreshes(recorder):
    s = train(_config(strategy="test_recorder", options={"refresh": 2}, epochs=3, select_fraction=0.25))
    selects, reports = _of(recorder, "select"), _of(recorder, "report")
    # The whole set in one call, budget round(N x fraction), at epochs 0 and 2 (refresh=2).
    assert [(e[1], e[5], e[6]) for e in selects] == [(0, 400, 100), (2, 400, 100)]
    assert s["refreshes"] == 2 and s["refresh_every"] == 2 and s["last_selection_size"] == 100
    for epoch in range(3):
        chosen = selects[0 if epoch < 2 else 1][3]
        trained = torch.cat([e[3] for e in reports if e[1] == epoch])
        # Every epoch is one shuffled pass over exactly the selected subset.
        assert sorted(trained.tolist()) == sorted(chosen.tolist())
    assert all(e[2] == 3 for e in reports)
    assert s["samples_trained"] == 300 and s["samples_scored"] == 800


def test_static_strategy_selects_once(recorder, monkeypatch):
    monkeypatch.setattr(_Recorder, "static", True, raising=False)
    s = train(_config(strategy="test_recorder", epochs=3))
    assert len(_of(recorder, "select")) == 1 and s["refreshes"] == 1 and s["refresh_every"] == "static"


def test_warmup_trains_full_data_and_reports_before_selecting(recorder, tmp_path):
    s = train(_config(tmp_path, strategy="test_recorder", options={"warmup_epochs": 2}, epochs=3))
    selects, reports = _of(recorder, "select"), _of(recorder, "report")
    assert [e[1] for e in selects] == [2]  # the first selection comes after warm-up
    for epoch in (0, 1):
        ids = torch.cat([e[3] for e in reports if e[1] == epoch])
        assert sorted(ids.tolist()) == list(range(400))  # warm-up: every sample, once, reported
    assert s["full_data_epochs"] == 2 and s["warmup_epochs"] == 2
    assert s["samples_trained"] == 2 * 400 + 200  # warm-up counts in the totals
    kinds = [json.loads(ln)["epoch_kind"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["full", "full", "subset"]


def test_weighted_trains_every_draw_with_its_weight(recorder, monkeypatch):
    seen_weights = []
    real = session_mod.weighted_loss

    def spy(per_sample, weights):
        seen_weights.append(None if weights is None else weights.clone())
        return real(per_sample, weights)

    monkeypatch.setattr(session_mod, "weighted_loss", spy)
    s = train(_config(strategy="test_recorder", mode="weighted", options={"kind": "replace"}, epochs=2))
    selects, reports = _of(recorder, "select"), _of(recorder, "report")
    assert [e[1] for e in selects] == [0, 1]  # a fresh draw every epoch
    assert s["refreshes"] == 2 and s["samples_trained"] == 2 * 200
    for epoch, sel in enumerate(selects):
        drawn = Counter(sel[3].tolist())
        assert max(drawn.values()) > 1  # the draw has repeats ...
        trained = Counter(torch.cat([e[3] for e in reports if e[1] == epoch]).tolist())
        assert trained == drawn  # ... and each occurrence is trained on
    # The weights the strategy returned reach the loss, permuted with their samples.
    got = torch.cat(seen_weights)
    want = torch.cat([e[4] for e in selects])
    assert sorted(got.tolist()) == sorted(want.tolist())


def test_online_accumulates_variable_selections_into_full_batches(recorder):
    s = train(_config(strategy="test_recorder", mode="online", options={"kind": "variable"}, epochs=2,
                      select_fraction=0.5))
    selects, reports = _of(recorder, "select"), _of(recorder, "report")
    for epoch in (0, 1):
        kept = sum(e[3].numel() for e in selects if e[1] == epoch)
        sizes = [e[3].numel() for e in reports if e[1] == epoch]
        assert sum(sizes) == kept  # everything kept is trained on, nothing twice
        assert all(n == 32 for n in sizes[:-1]) and 1 <= sizes[-1] <= 32  # full batches; remainder flushed
        assert sum(e[5] for e in selects if e[1] == epoch) == 400  # one pass of candidates
    assert s["steps"] == len(reports)


def test_selective_backprop_steps_on_full_batches():
    s = train(_config(strategy="selective_backprop", epochs=1, train_subset=1000, options={"warmup_epochs": 0}))
    # About a quarter of the candidates are kept (beta=3); every step but the last is a full batch.
    assert s["steps"] == -(-s["samples_trained"] // 32)
    assert 0.1 * 1000 < s["samples_trained"] < 0.5 * 1000


def test_budget_samples_stops_early_and_writes_summary(tmp_path):
    s = train(_config(tmp_path, strategy="random", epochs=5, budget_samples=300))
    assert s["stopped_by"] == "budget_samples"
    assert 300 <= s["samples_trained"] < 300 + 32
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[-1]["partial"] and not lines[0]["partial"]  # 200/epoch: stops in epoch 2
    assert lines[-1]["samples_trained"] == s["samples_trained"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["stopped_by"] == "budget_samples" and on_disk["epochs_completed"] == 1
    assert (tmp_path / "checkpoint.pt").is_file()


def test_budget_seconds_stops_early_and_writes_summary(tmp_path):
    s = train(_config(tmp_path, strategy="random", epochs=1000, budget_seconds=1.0))
    assert s["stopped_by"] == "budget_seconds"
    assert s["epochs_completed"] < 1000
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines and json.loads((tmp_path / "summary.json").read_text())["stopped_by"] == "budget_seconds"
    # The budget may run out mid-epoch (a partial last line) or exactly at an epoch's end.
    assert s["epochs_completed"] == len(lines) - (1 if lines[-1]["partial"] else 0)
    assert 0 < s["test_accuracy"] <= 1


def test_no_budget_runs_every_epoch():
    s = train(_config(strategy="random", epochs=1))
    assert s["stopped_by"] is None and s["epochs_completed"] == 1


def test_cli_budget_and_mode_flags(tmp_path):
    """The flags `dataselect compare` passes through to dataselect-train."""
    from click.testing import CliRunner

    from dataselect.client.cli import train_command

    res = CliRunner().invoke(train_command, [
        "--dataset", "synthetic", "--device", "cpu", "--train-subset", "200", "--test-subset", "100",
        "--batch-size", "32", "--threads", "1", "--strategy", "random", "--mode", "weighted", "--epochs", "3",
        "--budget-samples", "100", "--output", str(tmp_path), "--json", "-q"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["mode"] == "weighted" and s["stopped_by"] == "budget_samples" and s["budget_samples"] == 100
    res = CliRunner().invoke(train_command, ["--dataset", "synthetic", "--budget-seconds", "0"])
    assert res.exit_code != 0 and "budget-seconds" in res.output
