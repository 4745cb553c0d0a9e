"""Datasets as in-memory tensors: uint8 images `[N, C, H, W]`, int64 labels, stable int64 ids.

A sample's id is its index in the full training (or test) split, so ids stay
the same whatever subset or order the trainer walks; scoring state kept by id
(per-sample histories) therefore survives shuffling and `--train-subset`.

Images stay uint8 all the way to the model (the registry's models normalise
inside with the mean/std given here), which keeps pools four times smaller on
the wire and the normalisation in one place.

Files use torchvision's layout under the data directory (`--data-dir`, else
`$DATASELECT_DATA`, else `~/.cache/dataselect/data`):
    DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
    DIR/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dataselect.errors import InvalidArgument, NotFound

DATA_ENV = "DATASELECT_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/dataselect/data")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: Where the files go under the data directory (for error messages).
    layout: str = ""

    def model_kwargs(self) -> dict:
        """The keyword arguments every registered model takes (see dataselect.models)."""
        return {
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass
class Split:
    """One split held in memory; `ids[i]` is sample i's index in the full split."""

    inputs: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    ids: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int | None) -> "Split":
        """The first n samples (all when n is None)."""
        if n is None:
            return self
        return Split(self.inputs[:n], self.labels[:n], self.ids[:n])


@dataclass
class Dataset:
    info: DatasetInfo
    train: Split
    test: Split


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        "mnist", 10, 1, 28, (0.1307,), (0.3081,),
        layout="MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    ),
    "cifar10": DatasetInfo(
        # The true per-channel std of the training set (not the often-copied 0.2023/0.1994/0.2010).
        "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        layout="cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
    ),
    "synthetic": DatasetInfo("synthetic", 10, 1, 28, (0.5,), (0.25,)),
}

SYNTHETIC_TRAIN = 2000
SYNTHETIC_TEST = 500


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise InvalidArgument(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """`--data-dir`, else `$DATASELECT_DATA`, else `~/.cache/dataselect/data`."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return DEFAULT_DATA_DIR.expanduser()


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load a dataset into memory; `train_subset`/`test_subset` keep the first N samples.

    `seed` only affects `synthetic` (the real datasets are fixed files).
    """
    info = dataset_info(name)
    for flag, n in (("--train-subset", train_subset), ("--test-subset", test_subset)):
        if n is not None and n < 1:
            raise InvalidArgument(f"{flag} must be >= 1, got {n}")
    if name == "synthetic":
        train, test = _synthetic(seed)
    else:
        root = resolve_data_dir(data_dir)
        train, test = (_torchvision_split(info, root, train=flag, download=download) for flag in (True, False))
    for flag, n, split, label in (("--train-subset", train_subset, train, "training"),
                                  ("--test-subset", test_subset, test, "test")):
        if n is not None and n > len(split):
            raise InvalidArgument(f"{flag} {n} is larger than the {label} split of {name} ({len(split)} samples)")
    return Dataset(info, train.head(train_subset), test.head(test_subset))


def _torchvision_split(info: DatasetInfo, root: Path, *, train: bool, download: bool) -> Split:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[info.name]
    try:
        ds = cls(root=str(root), train=train, download=download)
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError... for missing files or no network
        raise _missing(info, root, download, exc) from None
    data = ds.data
    if isinstance(data, torch.Tensor):  # MNIST: uint8 [N, H, W]
        inputs = data.to(torch.uint8).unsqueeze(1).contiguous()
    else:  # CIFAR-10: numpy uint8 [N, H, W, C]
        inputs = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return Split(inputs, labels, torch.arange(labels.shape[0], dtype=torch.int64))


def _missing(info: DatasetInfo, root: Path, download: bool, exc: Exception) -> NotFound:
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    tried = f"; the download failed ({first})" if download else ""
    how = ("point --data-dir (or DATASELECT_DATA) at the folder that holds them"
           + (", or run on a connected machine to download them" if download
              else ", or pass --download on a connected machine"))
    return NotFound(
        f"dataset {info.name!r} not found under {root}{tried}: put the files at "
        f"{root / info.layout} (torchvision layout), {how}"
    )


def _synthetic(seed: int, n_train: int = SYNTHETIC_TRAIN, n_test: int = SYNTHETIC_TEST) -> tuple[Split, Split]:
    """Ten classes of 1x28x28 images: a smooth per-class prototype, jittered, scaled and noised.

    Learnable to high accuracy by every registered model within an epoch or
    two, yet noisy enough that the samples differ in difficulty, so selection
    strategies have something to choose between.
    """
    info = DATASETS["synthetic"]
    gen = torch.Generator().manual_seed(int(seed))
    k, size = info.num_classes, info.image_size
    coarse = torch.rand(k, 1, 7, 7, generator=gen)
    protos = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def draw(n: int) -> Split:
        labels = torch.randint(0, k, (n,), generator=gen)
        x = protos[labels] * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gen))
        shifts = torch.randint(-2, 3, (n, 2), generator=gen)
        x = torch.stack([torch.roll(img, shifts=(int(dy), int(dx)), dims=(1, 2)) for img, (dy, dx) in zip(x, shifts)])
        x = x + 0.35 * torch.randn(x.shape, generator=gen)
        inputs = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        return Split(inputs, labels.long(), torch.arange(n, dtype=torch.int64))

    train = draw(n_train)
    test = draw(n_test)
    return train, test
