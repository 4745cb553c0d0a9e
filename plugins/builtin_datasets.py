"""The built-in datasets, registered through the `register_datasets` hook like any plugin's.

* `mnist`, `cifar10`, `synthetic`: held in memory as uint8 tensors (the fast
  path), the same tensors in the same order as the trainer has always used.
  Files in torchvision's layout under the data directory:
      DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
      DIR/cifar-10-batches-py/{data_batch_1..5,test_batch}
* `imagefolder:DIR`: DIR/train/<class>/* and DIR/test/<class>/* (or DIR/val/);
  a folder without train/ is the training set and a seeded 10 % of it is held
  out as the test set. Decoded lazily.
* `torchvision:CLASS`: any torchvision dataset class taking the standard
  `root`, `train`, `transform`, `download` arguments (MNIST, FashionMNIST,
  KMNIST, CIFAR10, CIFAR100, ...), loaded lazily through the class.

Standard training augmentation: CIFAR-10/100 random crop 32 with padding 4 and
a horizontal flip; MNIST-like (grayscale) datasets none; other colour images
(imagefolder, other torchvision classes) a random crop padded by 1/8 of the
size and a horizontal flip.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dataselect
from dataselect.datasets import (
    GRAYSCALE_MODES,
    STATS_SAMPLE,
    Augmented,
    AugmentedSplit,
    DatasetInfo,
    DataSource,
    RandomCropFlip,
    Split,
    ToUint8,
    accepts_standard_arguments,
    generator_for,
)
from dataselect.errors import InvalidArgument, NotFound

MNIST_LAYOUT = "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)
CIFAR10_LAYOUT = f"{CIFAR10_DIR}/{{data_batch_1..5,test_batch}}"

SYNTHETIC_TRAIN = 2000
SYNTHETIC_TEST = 500

#: Share of an ImageFolder without a train/ subfolder held out as its test set.
HOLDOUT_SHARE = 0.1
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm"})
IMAGEFOLDER_LAYOUT = ("DIR/train/<class>/<image> and DIR/test/<class>/<image> (or DIR/val/), or "
                      "DIR/<class>/<image> (10 % is then held out as the test set)")


@dataselect.hookimpl
def register_datasets(register):
    register("mnist", load_mnist)
    register("cifar10", load_cifar10)
    register("synthetic", load_synthetic)
    register("imagefolder", load_imagefolder)
    register("torchvision", load_torchvision)


def _no_argument(name: str, argument: str | None) -> None:
    if argument is not None:
        raise InvalidArgument(f"dataset {name!r} takes no argument (got {argument!r}); use --dataset {name}")


def _missing(name: str, root: Path, layout: str, download: bool, exc: Exception | None) -> NotFound:
    first = "" if exc is None else next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    tried = f"; the download failed ({first})" if download and first else ""
    how = ("point --data-dir (or DATASELECT_DATA) at the folder that holds them"
           + (", or run on a connected machine to download them" if download
              else ", or pass --download on a connected machine"))
    return NotFound(f"dataset {name!r} not found under {root}{tried}: put the files at {root / layout} "
                    f"(torchvision layout), {how}")


def _in_memory(info: DatasetInfo, train: Split, test: Split, augment: RandomCropFlip | None) -> DataSource:
    return DataSource(
        info=info,
        train=AugmentedSplit(train, augment) if augment is not None else train,
        train_plain=train,
        test=test,
        train_labels=train.labels,
        train_tensors=train,
        test_tensors=test,
        augment_batch=augment,
    )


# -- mnist -------------------------------------------------------------------------------------------


def load_mnist(*, root: Path, argument: str | None, download: bool, seed: int, augment: bool) -> DataSource:
    """MNIST in memory (no augmentation: digits are not symmetric, and crops rarely help them)."""
    _no_argument("mnist", argument)
    import torchvision

    splits = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.MNIST(root=str(root), train=train, download=download)
        except Exception as exc:  # RuntimeError, URLError, OSError... for missing files or no network
            raise _missing("mnist", root, MNIST_LAYOUT, download, exc) from None
        inputs = ds.data.to(torch.uint8).unsqueeze(1).contiguous()
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        splits.append(Split(inputs, labels, torch.arange(labels.shape[0], dtype=torch.int64)))
    info = DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,))
    return _in_memory(info, splits[0], splits[1], None)


# -- cifar10 -----------------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays only: a data file must not run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays may be stored here")
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core." + module[len("numpy.core."):]
        return getattr(importlib.import_module(module), name)


def _read_cifar_batches(paths: list[Path], label_key: str) -> Split:
    data, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as f:
                entry = _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise InvalidArgument(f"{path} is not a CIFAR batch file ({exc}); replace it with the file from the "
                                  "python version of the dataset") from None
        if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
            raise InvalidArgument(f"{path} is not a CIFAR batch file (a dict with 'data' and {label_key!r}); "
                                  "replace it with the file from the python version of the dataset")
        array = np.asarray(entry["data"], dtype=np.uint8)
        if array.ndim != 2 or array.shape[1] != 3 * 32 * 32 or array.shape[0] != len(entry[label_key]):
            raise InvalidArgument(f"{path}: 'data' must be uint8 [N, 3072] with N labels; got {array.shape} and "
                                  f"{len(entry[label_key])} labels")
        data.append(array)
        labels.extend(int(v) for v in entry[label_key])
    inputs = torch.from_numpy(np.concatenate(data)).reshape(-1, 3, 32, 32).contiguous()
    targets = torch.tensor(labels, dtype=torch.int64)
    return Split(inputs, targets, torch.arange(targets.shape[0], dtype=torch.int64))


def load_cifar10(*, root: Path, argument: str | None, download: bool, seed: int, augment: bool) -> DataSource:
    """CIFAR-10 in memory from the python-version batch files; training augmentation: crop 32 pad 4 + flip."""
    _no_argument("cifar10", argument)
    folder = root / CIFAR10_DIR
    files = [folder / f for f in CIFAR10_TRAIN + CIFAR10_TEST]
    if not all(f.is_file() for f in files):
        error = None
        if download:
            import torchvision

            try:  # downloads and unpacks the archive, checking its md5
                torchvision.datasets.CIFAR10(root=str(root), train=True, download=True)
            except Exception as exc:
                error = exc
        if error is not None or not all(f.is_file() for f in files):
            raise _missing("cifar10", root, CIFAR10_LAYOUT, download, error)
    train = _read_cifar_batches([folder / f for f in CIFAR10_TRAIN], "labels")
    test = _read_cifar_batches([folder / f for f in CIFAR10_TEST], "labels")
    for split, what in ((train, "training"), (test, "test")):
        if split.labels.numel() and not 0 <= int(split.labels.min()) <= int(split.labels.max()) < 10:
            raise InvalidArgument(f"{folder}: the {what} labels are not classes 0..9; is it CIFAR-100?")
    # The true per-channel std of the training set (not the often-copied 0.2023/0.1994/0.2010).
    aug = RandomCropFlip(32, 4) if augment else None
    info = DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                       augmentation=aug.describe() if aug else "none")
    return _in_memory(info, train, test, aug)


# -- synthetic ---------------------------------------------------------------------------------------


def load_synthetic(*, root: Path, argument: str | None, download: bool, seed: int, augment: bool) -> DataSource:
    """Ten classes of 1x28x28 images: a smooth per-class prototype, jittered, scaled and noised.

    Learnable to high accuracy by every registered model within an epoch or
    two, yet noisy enough that the samples differ in difficulty, so selection
    strategies have something to choose between. Always the same data (drawn
    with seed 0), like a dataset on disk: the run's seed varies training, not data.
    """
    _no_argument("synthetic", argument)
    train, test = synthetic_splits(0)
    info = DatasetInfo("synthetic", 10, (1, 28, 28), (0.5,), (0.25,))
    return _in_memory(info, train, test, None)


def synthetic_splits(seed: int, n_train: int = SYNTHETIC_TRAIN, n_test: int = SYNTHETIC_TEST) -> tuple[Split, Split]:
    k, size = 10, 28
    gen = torch.Generator().manual_seed(int(seed))
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


# -- imagefolder -------------------------------------------------------------------------------------


class ImageFiles(torch.utils.data.Dataset):
    """Image files decoded on demand into uint8 `[C, size, size]`: resized (shorter side) and center-cropped."""

    def __init__(self, paths: list[str], labels: torch.Tensor, size: int, mode: str):
        self.paths, self.labels, self.size, self.mode = list(paths), labels.long(), int(size), mode
        self._to_tensor = ToUint8()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def targets(self) -> torch.Tensor:
        return self.labels

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for a broken file
            raise InvalidArgument(f"cannot read image {path} ({type(exc).__name__}: {exc}); "
                                  "replace or remove the file") from None
        return self._to_tensor(fit_square(image, self.size)), int(self.labels[i])


def fit_square(image, size: int):
    """Resize so the shorter side is `size` (bilinear), then crop the centre `size` x `size`."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def _resolve_folder(argument: str, root: Path) -> Path:
    path = Path(argument).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path.cwd() / path, root / path]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    tried = " or ".join(str(c) for c in candidates)
    raise NotFound(f"imagefolder: no folder {tried}; put the images at {IMAGEFOLDER_LAYOUT}, with DIR relative "
                   "to the working directory or to --data-dir")


def _scan(folder: Path) -> dict[str, list[str]]:
    """Class name -> sorted image paths under folder/<class>/ (recursively; hidden entries skipped)."""
    out = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        files = []
        for parent, dirs, names in os.walk(entry.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files.extend(os.path.join(parent, n) for n in sorted(names)
                         if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
        out[entry.name] = files
    return out


def _flatten(classes: list[str], by_class: dict[str, list[str]]) -> tuple[list[str], torch.Tensor]:
    paths, labels = [], []
    for c, name in enumerate(classes):
        paths.extend(by_class.get(name, []))
        labels.extend([c] * len(by_class.get(name, [])))
    return paths, torch.tensor(labels, dtype=torch.int64)


def load_imagefolder(*, root: Path, argument: str | None, download: bool, seed: int, augment: bool) -> DataSource:
    """Images in class folders, decoded lazily into squares of the most common image size."""
    check_imagefolder(argument)
    folder = _resolve_folder(argument, root)
    train_dir = folder / "train"
    test_dir = next((folder / d for d in ("test", "val") if (folder / d).is_dir()), None)
    if train_dir.is_dir():
        train_by_class = _scan(train_dir)
        classes = [c for c, files in train_by_class.items() if files]
        if not classes:
            raise NotFound(f"imagefolder: no images under {train_dir}; put them at {train_dir}/<class>/<image> "
                           f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        train_paths, train_labels = _flatten(classes, train_by_class)
        if test_dir is not None:
            test_by_class = _scan(test_dir)
            unknown = sorted(c for c, files in test_by_class.items() if files and c not in classes)
            if unknown:
                raise InvalidArgument(f"imagefolder: {test_dir} has classes with no training images: {unknown}; "
                                      f"add them under {train_dir} or remove them")
            test_paths, test_labels = _flatten(classes, test_by_class)
            if not test_paths:
                raise NotFound(f"imagefolder: no images under {test_dir}; put them at {test_dir}/<class>/<image>, "
                               f"or remove {test_dir} to hold out 10 % of the training images")
        else:
            train_paths, train_labels, test_paths, test_labels = _hold_out(train_paths, train_labels, seed, folder)
    else:
        if test_dir is not None:
            raise NotFound(f"imagefolder: found {test_dir} but no {train_dir}; put the training images at "
                           f"{train_dir}/<class>/<image>")
        by_class = _scan(folder)
        classes = [c for c, files in by_class.items() if files]
        if not classes:
            raise NotFound(f"imagefolder: no images in class folders under {folder}; put them at {IMAGEFOLDER_LAYOUT}")
        paths, labels = _flatten(classes, by_class)
        train_paths, train_labels, test_paths, test_labels = _hold_out(paths, labels, seed, folder)

    size, mode = _common_geometry(train_paths, seed)
    channels = 1 if mode == "L" else 3
    train = ImageFiles(train_paths, train_labels, size, mode)
    test = ImageFiles(test_paths, test_labels, size, mode)
    aug = RandomCropFlip(size, max(1, size // 8)) if augment else None
    info = DatasetInfo("imagefolder", len(classes), (channels, size, size), None, None,
                       augmentation=aug.describe() if aug else "none")
    return DataSource(info=info, train=Augmented(train, aug) if aug else train, train_plain=train, test=test,
                      train_labels=train_labels, train_tensors=None, test_tensors=None, augment_batch=None)


def check_imagefolder(argument: str | None) -> None:
    if not argument or not argument.strip():
        raise InvalidArgument(f"imagefolder needs a folder: --dataset imagefolder:DIR, with {IMAGEFOLDER_LAYOUT}")
    path = Path(argument).expanduser()
    if path.is_absolute() and not path.is_dir():
        raise NotFound(f"imagefolder: no folder {path}; put the images at {IMAGEFOLDER_LAYOUT}")


load_imagefolder.argument = "DIR"
load_imagefolder.check = check_imagefolder


def _hold_out(paths: list[str], labels: torch.Tensor, seed: int, folder: Path):
    n = len(paths)
    if n < 2:
        raise NotFound(f"imagefolder: {folder} holds {n} image(s); a test split needs more, or put one at "
                       f"{folder}/test/<class>/<image>")
    k = max(1, round(HOLDOUT_SHARE * n))
    order = torch.randperm(n, generator=generator_for(seed, "imagefolder_holdout"))
    test_idx = torch.sort(order[:k]).values.tolist()
    train_idx = torch.sort(order[k:]).values.tolist()
    return ([paths[i] for i in train_idx], labels[train_idx], [paths[i] for i in test_idx], labels[test_idx])


def _common_geometry(paths: list[str], seed: int) -> tuple[int, str]:
    """(side, PIL mode) from a seeded sample: the shorter side of the most common size; "L" if all are grayscale."""
    picks = torch.randperm(len(paths), generator=generator_for(seed, "stats"))[:STATS_SAMPLE].tolist()
    sizes, gray = Counter(), True
    for i in sorted(picks):
        try:
            with Image.open(paths[i]) as image:  # reads the header only
                sizes[image.size] += 1
                gray = gray and image.mode in GRAYSCALE_MODES
        except Exception as exc:
            raise InvalidArgument(f"cannot read image {paths[i]} ({type(exc).__name__}: {exc}); "
                                  "replace or remove the file") from None
    # Most common first; ties broken by the larger size, for a result that does not depend on file order.
    (w, h), _ = max(sizes.items(), key=lambda kv: (kv[1], kv[0]))
    return min(w, h), ("L" if gray else "RGB")


# -- torchvision:CLASS -------------------------------------------------------------------------------


#: torchvision classes given CIFAR's standard augmentation; grayscale ones get none.
CIFAR_LIKE = frozenset({"CIFAR10", "CIFAR100"})


def standard_torchvision_classes() -> list[str]:
    import torchvision

    names = []
    for name in dir(torchvision.datasets):
        obj = getattr(torchvision.datasets, name)
        if isinstance(obj, type) and issubclass(obj, torch.utils.data.Dataset) and accepts_standard_arguments(obj):
            names.append(name)
    return sorted(names)


def torchvision_class(argument: str | None) -> type:
    if not argument or not argument.strip():
        raise InvalidArgument("torchvision needs a dataset class: --dataset torchvision:CLASS, e.g. "
                              "torchvision:FashionMNIST")
    import torchvision

    known = standard_torchvision_classes()
    match = argument if argument in known else next((k for k in known if k.lower() == argument.lower()), None)
    if match is None:
        other = getattr(torchvision.datasets, argument, None)
        why = ("does not take the standard root/train/transform/download arguments; register it through the "
               "register_datasets plugin hook instead" if isinstance(other, type) else "is not a torchvision dataset")
        raise InvalidArgument(f"torchvision:{argument}: {argument} {why}; classes that work here: {', '.join(known)}")
    return getattr(torchvision.datasets, match)


def load_torchvision(*, root: Path, argument: str | None, download: bool, seed: int, augment: bool) -> DataSource:
    """A torchvision dataset class, loaded lazily through the class; shapes and classes read from it."""
    cls = torchvision_class(argument)
    name = cls.__name__
    splits = []
    for train in (True, False):
        try:
            splits.append(cls(root=str(root), train=train, transform=ToUint8(), download=download))
        except Exception as exc:  # RuntimeError "Dataset not found", URLError, OSError...
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            how = ("point --data-dir (or DATASELECT_DATA) at the folder that holds them"
                   + (", or run on a connected machine to download them" if download
                      else ", or pass --download on a connected machine"))
            raise NotFound(f"dataset torchvision:{name} not found under {root} ({first}): put its files where "
                           f"torchvision.datasets.{name}(root={str(root)!r}) looks for them (for MNIST: "
                           f"{root / MNIST_LAYOUT}), {how}") from None
    train_base, test_base = splits
    if len(train_base) == 0:
        raise NotFound(f"torchvision:{name}: the training split under {root} is empty")
    item = train_base[0]
    if not (isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], torch.Tensor)):
        raise InvalidArgument(f"torchvision:{name}: items are not (image, class index) pairs; register this dataset "
                              "through the register_datasets plugin hook with a loader of your own")
    try:
        int(item[1])
    except (TypeError, ValueError):
        raise InvalidArgument(f"torchvision:{name}: targets are {type(item[1]).__name__}, not class indices; "
                              "register this dataset through the register_datasets plugin hook instead") from None
    targets = getattr(train_base, "targets", None)
    if targets is not None and len(targets) == len(train_base):
        labels = torch.as_tensor(targets if isinstance(targets, torch.Tensor) else list(targets)).long()
    else:  # no targets attribute: every item is read once
        labels = torch.tensor([int(train_base[i][1]) for i in range(len(train_base))], dtype=torch.int64)
    classes = getattr(train_base, "classes", None)
    num_classes = len(classes) if classes else int(labels.max()) + 1
    shape = tuple(item[0].shape)
    aug = None
    if augment and item[0].dtype == torch.uint8 and len(shape) == 3:
        if name in CIFAR_LIKE:
            aug = RandomCropFlip(shape[-1], 4)
        elif shape[0] == 3:
            aug = RandomCropFlip(shape[-1], max(1, shape[-1] // 8))
    info = DatasetInfo(f"torchvision:{name}", num_classes, shape, None, None,
                       augmentation=aug.describe() if aug else "none")
    return DataSource(info=info, train=Augmented(train_base, aug) if aug else train_base, train_plain=train_base,
                      test=test_base, train_labels=labels, train_tensors=None, test_tensors=None, augment_batch=None)


def check_torchvision(argument: str | None) -> None:
    torchvision_class(argument)


load_torchvision.argument = "CLASS"
load_torchvision.check = check_torchvision

