"""The built-in in-memory datasets through open_dataset: shapes, dtypes, stable ids, subsets, the data
directory, and the errors for missing files (the plugin mechanics and the other loaders: test_datasets.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dataselect.datasets import open_dataset, resolve_data_dir
from dataselect.errors import DataselectError, InvalidArgument

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
needs_mnist = pytest.mark.skipif(
    not (SHARED_DATASETS / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file(),
    reason=f"real MNIST not present at {SHARED_DATASETS} (../shared/datasets from the repo root)",
)


def test_synthetic_shapes_ids_and_determinism():
    a = open_dataset("synthetic")
    b = open_dataset("synthetic", seed=1)  # fixed data, like files on disk: the seed varies training only
    assert a.info.model_kwargs() == {"num_classes": 10, "in_channels": 1, "image_size": 28,
                                     "mean": [0.5], "std": [0.25]}
    train, test = a.train_tensors, a.test_tensors
    assert train.inputs.dtype == torch.uint8 and train.inputs.shape == (2000, 1, 28, 28)
    assert test.inputs.shape == (500, 1, 28, 28)
    assert train.labels.dtype == torch.int64 and set(train.labels.tolist()) == set(range(10))
    assert torch.equal(train.ids, torch.arange(2000))
    assert torch.equal(train.inputs, b.train_tensors.inputs) and torch.equal(test.labels, b.test_tensors.labels)
    assert a.train is a.train_plain is train and a.augment_batch is None  # no augmentation


def test_train_subset_keeps_the_head_and_its_ids():
    full = open_dataset("synthetic")
    sub = open_dataset("synthetic", train_subset=300, test_subset=50)
    assert len(sub.train_tensors) == 300 and len(sub.test_tensors) == 50
    assert torch.equal(sub.train_tensors.inputs, full.train_tensors.inputs[:300])
    assert torch.equal(sub.train_tensors.ids, torch.arange(300))
    assert torch.equal(sub.test_tensors.labels, full.test_tensors.labels[:50])
    with pytest.raises(InvalidArgument, match="larger than"):
        open_dataset("synthetic", train_subset=10**6)


def test_unknown_dataset_lists_known():
    with pytest.raises(InvalidArgument, match="synthetic"):
        open_dataset("imagenet")


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("DATASELECT_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("DATASELECT_DATA")
    assert resolve_data_dir(None) == Path("~/.cache/dataselect/data").expanduser()


@needs_mnist
def test_real_mnist_loads():
    ds = open_dataset("mnist", SHARED_DATASETS, download=False)
    train, test = ds.train_tensors, ds.test_tensors
    assert train.inputs.shape == (60000, 1, 28, 28) and train.inputs.dtype == torch.uint8
    assert test.inputs.shape == (10000, 1, 28, 28)
    assert train.labels.dtype == torch.int64
    assert int(train.labels.min()) == 0 and int(train.labels.max()) == 9
    assert torch.equal(train.ids, torch.arange(60000))
    assert ds.info.mean == (0.1307,) and ds.info.std == (0.3081,)
    assert ds.info.augmentation == "none" and ds.train is train  # MNIST trains as it is


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_dataset_says_where_to_put_files(tmp_path, name):
    with pytest.raises(DataselectError) as err:
        open_dataset(name, tmp_path, download=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path) in msg and "--data-dir" in msg and "DATASELECT_DATA" in msg and "--download" in msg
    assert ("MNIST/raw" if name == "mnist" else "cifar-10-batches-py") in msg
