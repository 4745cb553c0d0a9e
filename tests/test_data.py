"""Datasets: shapes, dtypes, stable ids, and the errors for missing files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dataselect.client.data import DATASETS, load_dataset, resolve_data_dir
from dataselect.errors import DataselectError, InvalidArgument

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
needs_mnist = pytest.mark.skipif(
    not (SHARED_DATASETS / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file(),
    reason=f"real MNIST not present at {SHARED_DATASETS} (../shared/datasets from the repo root)",
)


def test_synthetic_shapes_ids_and_determinism():
    a = load_dataset("synthetic")
    b = load_dataset("synthetic")
    info = a.info
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 28)
    assert a.train.inputs.dtype == torch.uint8 and a.train.inputs.shape == (2000, 1, 28, 28)
    assert a.test.inputs.shape == (500, 1, 28, 28)
    assert a.train.labels.dtype == torch.int64 and set(a.train.labels.tolist()) == set(range(10))
    assert torch.equal(a.train.ids, torch.arange(2000))
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.test.labels, b.test.labels)
    c = load_dataset("synthetic", seed=1)
    assert not torch.equal(a.train.inputs, c.train.inputs)


def test_train_subset_keeps_the_head_and_its_ids():
    full = load_dataset("synthetic")
    sub = load_dataset("synthetic", train_subset=300, test_subset=50)
    assert len(sub.train) == 300 and len(sub.test) == 50
    assert torch.equal(sub.train.inputs, full.train.inputs[:300])
    assert torch.equal(sub.train.ids, torch.arange(300))
    with pytest.raises(InvalidArgument, match="larger than"):
        load_dataset("synthetic", train_subset=10**6)


def test_unknown_dataset_lists_known():
    with pytest.raises(InvalidArgument, match="synthetic"):
        load_dataset("imagenet")


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("DATASELECT_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("DATASELECT_DATA")
    assert resolve_data_dir(None) == Path("~/.cache/dataselect/data").expanduser()


@needs_mnist
def test_real_mnist_loads():
    ds = load_dataset("mnist", SHARED_DATASETS, download=False)
    assert ds.train.inputs.shape == (60000, 1, 28, 28) and ds.train.inputs.dtype == torch.uint8
    assert ds.test.inputs.shape == (10000, 1, 28, 28)
    assert ds.train.labels.dtype == torch.int64
    assert int(ds.train.labels.min()) == 0 and int(ds.train.labels.max()) == 9
    assert torch.equal(ds.train.ids, torch.arange(60000))
    assert ds.info.mean == (0.1307,) and ds.info.std == (0.3081,)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_dataset_says_where_to_put_files(tmp_path, name):
    with pytest.raises(DataselectError) as err:
        load_dataset(name, tmp_path, download=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path) in msg and "--data-dir" in msg and "DATASELECT_DATA" in msg and "--download" in msg
    assert ("MNIST/raw" if name == "mnist" else "cifar-10-batches-py") in msg


def _write_tiny_cifar(root: Path, per_batch: int = 4, n_test: int = 6) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        first = data if first is None else first
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": labels}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, fh)
    return first


def test_cifar10_loader_on_a_generated_archive(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    first = _write_tiny_cifar(tmp_path)
    # The generated files cannot match torchvision's md5 table; check existence only.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.info == DATASETS["cifar10"] and ds.info.in_channels == 3 and len(ds.info.mean) == 3
    assert ds.train.inputs.shape == (20, 3, 32, 32) and ds.train.inputs.dtype == torch.uint8
    assert ds.test.inputs.shape == (6, 3, 32, 32)
    assert ds.train.labels.dtype == torch.int64
    # CHW layout preserved: row 0 of the pickled batch is channel-major.
    assert torch.equal(ds.train.inputs[0], torch.from_numpy(first[0].reshape(3, 32, 32)))
