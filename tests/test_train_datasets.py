"""dataselect-train and dataselect compare on any dataset: an ImageFolder through DataLoader workers, dataset
variants recorded in the summary, and learning-rate schedules."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from dataselect.client.compare import CompareConfig, path_label, run_comparison
from dataselect.client.train import TrainConfig, train
from dataselect.client.training import make_scheduler
from dataselect.errors import InvalidArgument


def make_imagefolder(root: Path, classes=3, per_class=24, size=16, seed=0) -> Path:
    """A small ImageFolder whose classes differ in colour, with train/ and test/ splits."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", per_class), ("test", per_class // 3)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = torch.randint(0, 60, (size, size, 3), generator=g, dtype=torch.uint8)
                img[..., c] += 150
                Image.fromarray(img.numpy()).save(folder / f"{i}.png")
    return root


def _config(**kw) -> TrainConfig:
    base = dict(dataset="synthetic", epochs=1, device="cpu", threads=1, progress=False, train_subset=400,
                test_subset=200, batch_size=32)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("strategy", ["high_loss", "dynams"])
def test_dataselect_train_on_an_imagefolder_through_dataloader_workers(tmp_path, strategy):
    root = make_imagefolder(tmp_path / "pets")
    s = train(_config(dataset=f"imagefolder:{root}", strategy=strategy, epochs=2, num_workers=2, train_subset=None,
                      test_subset=None, batch_size=8, output=str(tmp_path / "run")))
    assert s["train_samples"] == 72 and s["test_samples"] == 24
    assert s["augmentation"] != "none"  # colour images get the standard crop + flip
    assert s["test_accuracy"] > 0.6  # three colours: learnable in two epochs
    # high_loss keeps half of each batch; dynams trains its warm-up epoch on all 72, then half
    assert s["samples_trained"] == (2 * 36 if strategy == "high_loss" else 72 + 36)
    assert (tmp_path / "run" / "summary.json").is_file()


def test_label_noise_and_imbalance_are_recorded_and_noisy_samples_counted():
    s = train(_config(label_noise=0.3, imbalance=4.0, strategy="high_loss", train_subset=None))
    variant = s["variant"]
    assert variant["label_noise"] == 0.3 and variant["imbalance"] == 4.0 and variant["seed"] == 0
    counts = variant["class_counts"]
    assert round(max(counts) / min(counts)) == 4 and s["train_samples"] == sum(counts)
    assert 0 < s["noisy_samples_trained"] <= s["samples_trained"]
    clean = train(_config(strategy="high_loss"))
    assert clean["variant"] == {} and clean["noisy_samples_trained"] is None


def test_a_bad_dataset_fails_before_anything_is_loaded():
    with pytest.raises(InvalidArgument, match="imagefolder:DIR"):
        train(_config(dataset="nope"))
    with pytest.raises(InvalidArgument, match="label-noise"):
        train(_config(label_noise=1.0))


def test_learning_rate_schedules_follow_their_shape():
    def rates(name, steps=100):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        sched = make_scheduler(opt, name, steps)
        out = []
        for _ in range(steps + 10):  # steps past the estimate keep the last rate
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            if sched is not None:
                sched.step()
        return out

    assert make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "constant", 10) is None
    cos = rates("cosine")
    assert cos[0] == 1.0 and abs(cos[50] - 0.5) < 1e-6 and cos[100] < 1e-9 and cos[-1] < 1e-9
    one = rates("onecycle")
    assert abs(one[0] - 0.04) < 1e-9 and abs(one[30] - 1.0) < 1e-9 and one[100] < 1e-3
    assert all(a <= b for a, b in zip(one[:30], one[1:31])) and all(a >= b for a, b in zip(one[30:100], one[31:101]))
    with pytest.raises(InvalidArgument, match="onecycle"):
        rates("step")


def test_compare_names_imagefolder_runs_by_a_folder_safe_label(tmp_path):
    label = path_label(f"imagefolder:{tmp_path}/pets")
    assert "/" not in label and ":" not in label and label.startswith("imagefolder_")
    assert path_label("mnist") == "mnist"
    with pytest.raises(InvalidArgument, match="known datasets|unknown dataset"):
        run_comparison(CompareConfig(output=tmp_path / "out", strategies=["high_loss"], datasets=["nope"]))


@pytest.mark.slow
def test_dataselect_compare_accepts_an_imagefolder(tmp_path):
    root = make_imagefolder(tmp_path / "pets")
    config = CompareConfig(output=tmp_path / "out", strategies=["high_loss"], datasets=[f"imagefolder:{root}"],
                           epochs=1, repeats=1, device="cpu",
                           trainer_args=["--batch-size", "8", "--threads", "1", "--num-workers", "0"])
    results = run_comparison(config, log=lambda msg: None)
    assert not results.all_failed
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and all(f"imagefolder:{root}" in r for r in rows[1:])
    summary = json.loads(next((tmp_path / "out" / "runs").rglob("summary.json")).read_text())
    assert summary["dataset"] == f"imagefolder:{root}"


@pytest.mark.slow
def test_dataselect_compare_over_variants_reports_each_cell_and_the_noisy_share(tmp_path):
    from click.testing import CliRunner

    from dataselect.client.main import cli

    result = CliRunner().invoke(cli, ["compare", "--strategies", "high_loss", "--dataset", "synthetic",
                                      "--variants", "clean,noise=0.3", "--epochs", "1", "--repeats", "1",
                                      "--train-subset", "400", "--test-subset", "200", "--device", "cpu",
                                      "--threads", "1", "--output", str(tmp_path / "out"), "--", "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    rows = {(r["dataset"], r["strategy"]): r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    assert set(rows) == {("synthetic", "full"), ("synthetic", "high_loss"), ("synthetic [noise=0.3]", "full"),
                         ("synthetic [noise=0.3]", "high_loss")}
    assert rows[("synthetic", "high_loss")]["noisy_share_mean"] in ("", "nan")
    share = float(rows[("synthetic [noise=0.3]", "full")]["noisy_share_mean"])
    assert 0.2 < share < 0.4  # full data trains on every sample, so on the noise rate
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").rglob("summary.json")]
    noisy = [s for s in summaries if s["variant"]]
    assert len(summaries) == 4 and len(noisy) == 2
    assert all(s["variant"]["label_noise"] == 0.3 and s["config"]["batch_size"] == 32 for s in noisy)
