"""`dataselect compare`: aggregation math on hand-made summaries, the runner against a fake
trainer (resume, failures, plots), and one end-to-end run of the real trainer."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import struct
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from dataselect.errors import InvalidArgument

from dataselect.client import compare as C
from dataselect.client.main import compare_command
from dataselect.client.compare import (
    FULL,
    markdown_table,
    CompareConfig,
    RunRecord,
    aggregate,
    mean_std,
    run_comparison,
    time_to_accuracy,
)

# ---------------------------------------------------------------- aggregation math


def rec(strategy, seed, acc, wall, *, train=1.0, score=0.0, metrics=(), dataset="mnist", model="cnn-small", **kw):
    summary = {"test_accuracy": acc, "wall_seconds": wall, "train_seconds": train, "score_seconds": score,
               "server_compute_seconds": score, "samples_trained": 100, "samples_scored": 200, **kw}
    return RunRecord(dataset, model, strategy, seed, summary=summary, metrics=list(metrics))


def ep(epoch, wall, acc):
    return {"epoch": epoch, "wall_seconds": wall, "test_accuracy": acc}


def test_mean_std_uses_sample_std_and_zero_for_one_value():
    m, s = mean_std([1.0, 2.0, 3.0, 4.0])
    assert m == pytest.approx(2.5)
    assert s == pytest.approx(math.sqrt(5 / 3))  # ddof=1: sum of squares 5 over n-1 = 3
    assert mean_std([7.0]) == (7.0, 0.0)
    m, s = mean_std([])
    assert math.isnan(m) and math.isnan(s)


def test_time_to_accuracy_interpolates_between_the_epochs_around_the_crossing():
    metrics = [ep(1, 10.0, 0.80), ep(2, 20.0, 0.90), ep(3, 30.0, 0.96)]
    # 0.93 lies 1/2 of the way from 0.90 (20 s) to 0.96 (30 s).
    assert time_to_accuracy(metrics, 0.93) == pytest.approx(25.0)
    assert time_to_accuracy(metrics, 0.90) == pytest.approx(20.0)  # reached exactly at an epoch
    assert time_to_accuracy(list(reversed(metrics)), 0.93) == pytest.approx(25.0)  # order of lines irrelevant


def test_time_to_accuracy_first_epoch_crossing_reports_that_epochs_time():
    # Nothing is measured before epoch 1, so its own time is reported, not a guess from (0 s, 0 %).
    assert time_to_accuracy([ep(1, 12.0, 0.97), ep(2, 24.0, 0.98)], 0.95) == pytest.approx(12.0)


def test_time_to_accuracy_not_reached_is_none_and_dips_do_not_count_twice():
    assert time_to_accuracy([ep(1, 10.0, 0.5), ep(2, 20.0, 0.6)], 0.9) is None
    assert time_to_accuracy([], 0.9) is None
    # First crossing wins even if accuracy dips below again later.
    metrics = [ep(1, 10.0, 0.5), ep(2, 20.0, 0.95), ep(3, 30.0, 0.4), ep(4, 40.0, 0.99)]
    assert time_to_accuracy(metrics, 0.9) == pytest.approx(10.0 + 0.4 / 0.45 * 10.0)


def test_aggregate_speedup_delta_and_time_to_target():
    records = [
        rec(FULL, 0, 0.98, 100.0, train=90.0, metrics=[ep(1, 50, 0.96), ep(2, 100, 0.98)]),
        rec(FULL, 1, 0.96, 120.0, train=110.0, metrics=[ep(1, 60, 0.95), ep(2, 120, 0.96)]),
        rec("high_loss", 0, 0.975, 50.0, train=30.0, score=15.0, metrics=[ep(1, 25, 0.90), ep(2, 50, 0.975)]),
        rec("high_loss", 1, 0.965, 60.0, train=35.0, score=20.0, metrics=[ep(1, 30, 0.90), ep(2, 60, 0.94)]),
        RunRecord("mnist", "cnn-small", "high_loss", 2, error="CUDA out of memory"),
    ]
    rows = aggregate(records, target=None)
    assert [r.strategy for r in rows] == [FULL, "high_loss"]
    full, hl = rows
    assert full.stats["test_accuracy"] == pytest.approx((0.97, math.sqrt(2 * 0.01 ** 2)))
    assert full.speedup == pytest.approx(1.0)
    assert full.delta_accuracy_points == pytest.approx(0.0)
    # Default target: full-data mean final accuracy (0.97) minus half a point.
    assert full.target == pytest.approx(0.965) and hl.target == pytest.approx(0.965)
    assert hl.runs == 3 and hl.runs_ok == 2
    assert hl.errors == ["seed2: CUDA out of memory"]
    assert hl.stats["wall_seconds"][0] == pytest.approx(55.0)
    assert hl.speedup == pytest.approx(110.0 / 55.0)
    assert hl.delta_accuracy_points == pytest.approx((0.97 - 0.97) * 100, abs=1e-9)
    # seed 0 crosses 0.965 between (25 s, 0.90) and (50 s, 0.975); seed 1 never does.
    assert hl.target_reached == 1
    assert hl.time_to_target[0] == pytest.approx(25 + (0.065 / 0.075) * 25)
    # Full: seed 0 first epoch (0.96) is below 0.965 -> interpolate to 0.98 at 100 s; seed 1 never.
    assert full.target_reached == 1
    assert full.time_to_target[0] == pytest.approx(50 + 0.005 / 0.02 * 50)


def test_aggregate_explicit_target_and_groups_per_dataset_and_model():
    records = [
        rec(FULL, 0, 0.99, 10.0, metrics=[ep(1, 10, 0.99)]),
        rec("random", 0, 0.90, 5.0, metrics=[ep(1, 5, 0.90)]),
        rec(FULL, 0, 0.70, 40.0, model="cnn-deep", metrics=[ep(1, 40, 0.70)]),
        rec("random", 0, 0.65, 10.0, model="cnn-deep", metrics=[ep(1, 10, 0.65)]),
    ]
    rows = aggregate(records, target=0.8)
    assert [(r.model, r.strategy) for r in rows] == [
        ("cnn-small", FULL), ("cnn-small", "random"), ("cnn-deep", FULL), ("cnn-deep", "random")]
    assert rows[1].speedup == pytest.approx(2.0)
    assert rows[1].delta_accuracy_points == pytest.approx(-9.0)
    assert rows[3].speedup == pytest.approx(4.0)
    assert rows[3].delta_accuracy_points == pytest.approx(-5.0)
    assert rows[1].target_reached == 1 and rows[1].time_to_target == (5.0, 0.0)
    assert rows[3].target_reached == 0
    md = C.markdown_table(rows)
    assert "not reached (0/1)" in md and "2.00×" in md and "-9.00" in md


def test_aggregate_without_baseline_leaves_reference_columns_empty():
    rows = aggregate([rec("random", 0, 0.9, 5.0)], target=None)
    assert math.isnan(rows[0].speedup) and rows[0].target is None
    assert "—" in C.markdown_table(rows)


def test_baseline_gets_fraction_one_and_no_strategy_options(tmp_path):
    cfg = CompareConfig(output=tmp_path, strategies=["high_loss"], trainer_cmd=["T"],
                        trainer_args=["--select-fraction", "0.3", "-o", "k=v", "--option=a=b", "--lr", "0.1"])
    full = C.trainer_argv(cfg, C.RunSpec("mnist", "cnn-small", FULL, 0), tmp_path)
    hl = C.trainer_argv(cfg, C.RunSpec("mnist", "cnn-small", "high_loss", 0), tmp_path)
    assert full[full.index("--strategy") + 1] == "random"
    assert full[-2:] == ["--select-fraction", "1.0"] and "0.3" not in full and "k=v" not in full
    assert "a=b" not in " ".join(full) and full[full.index("--lr") + 1] == "0.1"
    assert hl[-7:] == ["--select-fraction", "0.3", "-o", "k=v", "--option=a=b", "--lr", "0.1"]


# ---------------------------------------------------------------- runner with a fake trainer

FAKE_TRAINER = textwrap.dedent('''
    """Stands in for dataselect-train: writes plausible summary.json/metrics.jsonl."""
    import argparse, json, os, sys
    p = argparse.ArgumentParser()
    for a in ("--strategy", "--model", "--dataset", "--output", "--select-fraction", "--device"):
        p.add_argument(a)
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--quiet", action="store_true")
    args, rest = p.parse_known_args()
    with open(os.environ["FAKE_TRAINER_LOG"], "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    if args.strategy == os.environ.get("FAKE_FAIL_STRATEGY") and args.select_fraction != "1.0":
        print("loading data", file=sys.stderr)
        print("RuntimeError: fake trainer told to fail", file=sys.stderr)
        sys.exit(3)
    full = args.select_fraction == "1.0"
    per_epoch = 2.0 if full else 1.0
    acc, wall, rows = 0.0, 0.0, []
    for e in range(1, args.epochs + 1):
        acc = 1 - 0.5 ** (e + (1 if full else 0)) - 0.001 * args.seed
        wall += per_epoch
        rows.append({"epoch": e, "test_accuracy": acc, "wall_seconds": wall,
                     "train_seconds": 0.6 * wall, "score_seconds": 0.0 if full else 0.3 * wall})
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\\n" for r in rows)
    last = rows[-1]
    summary = dict(strategy=args.strategy, dataset=args.dataset, model=args.model, epochs=args.epochs,
                   test_accuracy=acc, wall_seconds=wall, train_seconds=last["train_seconds"],
                   score_seconds=last["score_seconds"], server_compute_seconds=last["score_seconds"],
                   transfer_seconds=0.0, eval_seconds=0.1, samples_trained=100 * args.epochs,
                   samples_scored=0 if full else 200 * args.epochs, checkpoint_bytes=0, device="cpu", config={})
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(summary, f)
''')


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    log = tmp_path / "invocations.jsonl"
    monkeypatch.setenv("FAKE_TRAINER_LOG", str(log))

    def calls() -> list[list[str]]:
        return [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []

    return [sys.executable, str(script)], calls


def config(tmp_path, trainer_cmd, **kw):
    base = dict(output=tmp_path / "out", strategies=["random", "high_loss"], models=["cnn-small"],
                datasets=["mnist"], epochs=2, repeats=2, seed=5, trainer_cmd=trainer_cmd)
    base.update(kw)
    return CompareConfig(**base)


def test_runs_every_combination_and_writes_tables(tmp_path, fake_trainer):
    cmd, calls = fake_trainer
    cfg = config(tmp_path, cmd, models=["cnn-small", "mlp"], trainer_args=["--train-subset", "300"])
    res = run_comparison(cfg, log=lambda m: None, progress=False)
    assert len(calls()) == 2 * 3 * 2  # models × (full + 2 strategies) × repeats
    assert all(c[c.index("--train-subset") + 1] == "300" for c in calls())
    assert sorted({c[c.index("--seed") + 1] for c in calls()}) == ["5", "6"]
    out = cfg.output
    assert (out / "runs/mnist/mlp/high_loss/seed6/summary.json").exists()
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["strategy"]) for r in rows] == [
        ("cnn-small", FULL), ("cnn-small", "random"), ("cnn-small", "high_loss"),
        ("mlp", FULL), ("mlp", "random"), ("mlp", "high_loss")]
    assert float(rows[1]["speedup"]) == pytest.approx(2.0)  # fake full takes 2 s/epoch, others 1 s
    assert rows[1]["runs_ok"] == "2" and rows[1]["errors"] == ""
    assert "| mnist | mlp | high_loss |" in (out / "results.md").read_text()
    info = json.loads((out / "config.json").read_text())
    assert info["config"]["strategies"] == ["random", "high_loss"]
    assert {"dataselect", "torch", "torchvision", "python", "platform"} <= set(info["versions"])
    assert "device_requested" in info


def test_resume_skips_runs_with_a_summary(tmp_path, fake_trainer):
    cmd, calls = fake_trainer
    cfg = config(tmp_path, cmd)
    run_comparison(cfg, log=lambda m: None, progress=False)
    assert len(calls()) == 6
    # Drop one run's summary: only that run is redone.
    (cfg.output / "runs/mnist/cnn-small/random/seed6/summary.json").unlink()
    cfg.resume = True
    res = run_comparison(cfg, log=lambda m: None, progress=False)
    assert len(calls()) == 7
    assert calls()[-1][calls()[-1].index("--seed") + 1] == "6"
    assert sum(r.resumed for r in res.records) == 5 and all(r.ok for r in res.records)
    # Without --resume everything runs again.
    cfg.resume = False
    run_comparison(cfg, log=lambda m: None, progress=False)
    assert len(calls()) == 13


def test_a_failing_run_is_recorded_and_the_rest_go_on(tmp_path, fake_trainer, monkeypatch):
    cmd, calls = fake_trainer
    monkeypatch.setenv("FAKE_FAIL_STRATEGY", "high_loss")
    cfg = config(tmp_path, cmd)
    lines: list[str] = []
    res = run_comparison(cfg, log=lines.append, progress=False)
    assert len(calls()) == 6 and not res.all_failed
    err = (cfg.output / "runs/mnist/cnn-small/high_loss/seed5/error.txt").read_text().strip()
    assert err == "RuntimeError: fake trainer told to fail"
    assert any("FAILED" in ln and "high_loss/seed5" in ln for ln in lines)
    row = next(r for r in res.rows if r.strategy == "high_loss")
    assert row.runs_ok == 0 and row.errors == ["seed5, seed6: RuntimeError: fake trainer told to fail"]
    assert "fake trainer told to fail" in (cfg.output / "results.md").read_text()
    assert next(r for r in res.rows if r.strategy == "random").runs_ok == 2
    # A later resume retries the failed runs only, and a success clears error.txt.
    monkeypatch.delenv("FAKE_FAIL_STRATEGY")
    cfg.resume = True
    res = run_comparison(cfg, log=lambda m: None, progress=False)
    assert len(calls()) == 8 and all(r.ok for r in res.records)
    assert not (cfg.output / "runs/mnist/cnn-small/high_loss/seed5/error.txt").exists()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_plots_show_one_line_per_strategy_and_stacked_costs(tmp_path, fake_trainer):
    pytest.importorskip("matplotlib")
    cmd, _ = fake_trainer
    cfg = config(tmp_path, cmd, models=["cnn-small", "cnn-deep"])
    res = run_comparison(cfg, log=lambda m: None, progress=False)
    for name in ("accuracy_vs_time.png", "cost_breakdown.png"):
        w, h = png_size(cfg.output / name)
        assert w == int(5.5 * 2 * 110) and h == int(4.2 * 110)  # two model panels at 110 dpi

    fig = C.plot_accuracy_vs_time(res.records, {("mnist", "cnn-small"): 0.9})
    axes = fig.axes
    assert [a.get_title() for a in axes] == ["mnist / cnn-small", "mnist / cnn-deep"]
    for ax in axes:
        curves = [ln for ln in ax.get_lines() if not ln.get_label().startswith("target")]
        assert [ln.get_label() for ln in curves] == ["full (n=2)", "random (n=2)", "high_loss (n=2)"]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert ("target 90.00%" in legend) == (ax.get_title() == "mnist / cnn-small")
        # Mean over the two seeds of the fake's per-epoch accuracies and cumulative seconds.
        hl = curves[2]
        assert list(hl.get_xdata()) == pytest.approx([1.0, 2.0])
        assert list(hl.get_ydata()) == pytest.approx([100 * (0.5 - 0.0055), 100 * (0.75 - 0.0055)])
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None
    C._pyplot().close(fig)

    fig = C.plot_cost_breakdown(res.rows)
    ax = fig.axes[0]
    assert [c.get_label() for c in ax.containers] == ["training", "scoring", "other"]
    heights = [[p.get_height() for p in c] for c in ax.containers]
    # full: 4 s wall, 2.4 s training, 0 scoring; others: 2 s wall, 1.2 training, 0.6 scoring.
    assert heights[0] == pytest.approx([2.4, 1.2, 1.2])
    assert heights[1] == pytest.approx([0.0, 0.6, 0.6])
    assert heights[2] == pytest.approx([1.6, 0.2, 0.2])
    C._pyplot().close(fig)


# ---------------------------------------------------------------- CLI


def test_cli_rejects_unknown_strategy_before_running(tmp_path, fake_trainer):
    _, calls = fake_trainer
    result = CliRunner().invoke(compare_command, ["--strategies", "random,no_such", "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "unknown strategy 'no_such'" in result.output
    assert calls() == [] and not (tmp_path / "o").exists()


def test_cli_exit_code_only_fails_when_every_run_fails(tmp_path, fake_trainer, monkeypatch):
    cmd, calls = fake_trainer
    monkeypatch.setattr(C, "default_trainer_cmd", lambda: cmd)
    args = ["--strategies", "high_loss", "--epochs", "1", "--repeats", "1", "--train-subset", "300",
            "-o", "k=v", "--no-download", "--device", "cpu"]
    monkeypatch.setenv("FAKE_FAIL_STRATEGY", "high_loss")
    result = CliRunner().invoke(compare_command, [*args, "--output", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "| mnist | cnn-small | high_loss | 0/1 |" in result.output
    hl_call = next(c for c in calls() if c[c.index("--strategy") + 1] == "high_loss")
    for flag in ("--train-subset", "--option", "--no-download", "--device", "--quiet"):
        assert flag in hl_call

    # Make the baseline fail too: every run failed -> non-zero exit.
    monkeypatch.setattr(C, "default_trainer_cmd", lambda: [sys.executable, "-c", "import sys; sys.exit('boom')"])
    result = CliRunner().invoke(compare_command, [*args, "--output", str(tmp_path / "b")])
    assert result.exit_code == 1
    assert "every run failed" in result.output
    assert (tmp_path / "b/runs/mnist/cnn-small/full/seed0/error.txt").read_text().strip() == "boom"


# ---------------------------------------------------------------- the real trainer

HAS_TRAINER = importlib.util.find_spec("dataselect.client.cli") is not None


@pytest.mark.skipif(not HAS_TRAINER, reason="dataselect.client.cli (the trainer) is not installed")
def test_real_trainer_on_synthetic_data(tmp_path):
    out = tmp_path / "real"
    result = CliRunner().invoke(compare_command, [
        "--strategies", "random,high_loss", "--models", "cnn-small", "--dataset", "synthetic",
        "--epochs", "1", "--repeats", "1", "--train-subset", "300", "--test-subset", "200",
        "--device", "cpu", "--threads", "1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["strategy"] for r in rows] == [FULL, "random", "high_loss"]
    for r in rows:
        assert r["runs_ok"] == "1", r["errors"]
        assert 0.0 <= float(r["test_accuracy_mean"]) <= 1.0
        assert float(r["wall_seconds_mean"]) > 0
    full, _, hl = rows
    assert float(full["samples_scored_mean"]) == 0  # fraction 1.0 scores nothing
    assert float(hl["samples_scored_mean"]) > 0
    assert float(full["speedup"]) == pytest.approx(1.0)
    summary = json.loads((out / "runs/synthetic/cnn-small/full/seed0/summary.json").read_text())
    assert summary["config"]["select_fraction"] == 1.0 and summary["strategy"] == "random"
    assert (out / "accuracy_vs_time.png").exists() and (out / "cost_breakdown.png").exists()


def test_variants_become_their_own_rows_with_the_trainer_flags(tmp_path):
    from dataselect.client import compare as C

    assert C.variant_args("clean") == []
    assert C.variant_args("noise=0.2") == ["--label-noise", "0.2"]
    assert C.variant_args("noise=0.4+imbalance=10") == ["--label-noise", "0.4", "--imbalance", "10"]
    for bad in ("noisy=0.2", "noise", "imbalance=x", ""):
        with pytest.raises(InvalidArgument, match="clean, noise=P"):
            C.variant_args(bad)
    cfg = C.CompareConfig(output=tmp_path, strategies=["high_loss"], variants=["clean", "noise=0.2"], repeats=2)
    specs = C.plan_runs(cfg)
    assert len(specs) == 2 * 2 * 2 and {s.label for s in specs} == {"mnist", "mnist [noise=0.2]"}
    noisy = next(s for s in specs if s.variant == "noise=0.2")
    argv = C.trainer_argv(cfg, noisy, tmp_path)
    assert argv[argv.index("--label-noise") + 1] == "0.2"
    assert noisy.run_dir(tmp_path) != next(s for s in specs if s.variant == "clean"
                                           and s.strategy == noisy.strategy and s.seed == noisy.seed).run_dir(tmp_path)


def test_time_to_target_comes_from_the_budget_clock_when_the_run_has_evaluation_points():
    from dataselect.client.compare import run_time_to_target

    r = rec("high_loss", 0, 0.95, 20.0, metrics=[ep(1, 10.0, 0.8), ep(2, 20.0, 0.9)])
    r.summary["eval_points"] = [{"seconds": 4.0, "test_accuracy": 0.8}, {"seconds": 8.0, "test_accuracy": 0.9}]
    assert run_time_to_target(r, 0.85) == pytest.approx(6.0)  # not the epoch lines' wall-clock (15 s)


def test_noisy_share_is_reported_for_noisy_variants():
    a = rec("high_loss", 0, 0.9, 10.0)
    a.summary.update(noisy_samples_trained=30, samples_trained=100)
    rows = aggregate([rec(FULL, 0, 0.9, 10.0), a])
    assert rows[1].stats["noisy_share"][0] == pytest.approx(0.3)
    assert "noisy trained (%)" in markdown_table(rows) and "30.0" in markdown_table(rows)
