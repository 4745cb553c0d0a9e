"""Any dataset: a registry of loaders, in-memory and lazily loaded splits, augmentation, noisy and imbalanced variants.

`open_dataset(spec)` is the one entry point:

    source = open_dataset("cifar10", train_subset=5000, label_noise=0.2)
    source = open_dataset("imagefolder:data/pets")
    source = open_dataset("torchvision:FashionMNIST", data_dir="data")

A spec is `NAME` or `NAME:ARGUMENT`; NAME is looked up among the datasets
registered through the `register_datasets` plugin hook (built in: `mnist`,
`cifar10`, `synthetic`, `imagefolder:DIR`, `torchvision:CLASS`), and the text
after the first colon goes to the loader.

Every dataset comes back as a `DataSource`: map-style training (augmented and
plain) and test datasets whose items are `(input, int label)`, the training
labels as one tensor, and, for datasets held in memory, the splits as tensors
with a vectorised batch augmentation (the fast path). Images are uint8
`[C, H, W]` tensors wherever possible: four times smaller than floats on the
wire, and the registry's models normalise inside with `info.mean/std`.
Lazily loaded datasets decode on demand, are picklable and hold no lambdas,
so they go through a `torch.utils.data.DataLoader` with workers and may be
larger than memory.

A sample's id is its position in the final training set (0..N-1, after the
subset and the variants); `DataSource.train_index` maps it back to the index
in the loader's full training split.

Variants (training split only, fixed by `seed`, recorded in
`DataSource.variant`): class imbalance first, then label noise.

Handing a source to `dataselect.Session.loader`:

    if source.train_tensors is not None:   # in memory: indexed directly, batches augmented at once
        loader = session.loader(source.train_tensors, batch_size, augment=source.augment_batch)
    else:                                  # lazily loaded: a DataLoader with workers
        loader = session.loader(source.train, batch_size, plain=source.train_plain,
                                labels=source.train_labels, num_workers=4)
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dataselect import registry
from dataselect.errors import InvalidArgument, PluginError

DATA_ENV = "DATASELECT_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/dataselect/data")
#: At most this many training images are decoded to estimate a dataset's mean and std.
STATS_SAMPLE = 1000


# -- what a loader returns ----------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a run summary need to know about a dataset."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    augmentation: str = "none"

    def model_kwargs(self) -> dict:
        """The keyword arguments every registered image model takes (see dataselect.models).

        Raises InvalidArgument for inputs the registry's image models cannot
        take (not `[C, H, W]`, or not square), naming what to do instead.
        """
        shape = tuple(self.input_shape)
        if len(shape) != 3:
            raise InvalidArgument(
                f"dataset {self.name!r} has inputs of shape {shape}, not images [C, H, W]: the registry's image "
                "models cannot take them; register a model for these inputs (the register_models hook) and build "
                "it with arguments of your own")
        channels, height, width = shape
        if height != width:
            raise InvalidArgument(
                f"dataset {self.name!r} has non-square images {shape}: the registry's image models take square "
                "images; resize or crop them to a square in the dataset's loader (imagefolder does), or build a "
                "model of your own")
        if self.mean is None or self.std is None:
            raise InvalidArgument(f"dataset {self.name!r} gives no per-channel mean/std; set DatasetInfo.mean and "
                                  "std in its loader")
        return {"num_classes": self.num_classes, "in_channels": channels, "image_size": height,
                "mean": list(self.mean), "std": list(self.std)}


@dataclass
class Split(torch.utils.data.Dataset):
    """One split held in memory; item i is `(inputs[i], int(labels[i]))` and `ids[i]` its sample id."""

    inputs: torch.Tensor  # uint8 [N, C, H, W] for images
    labels: torch.Tensor  # int64 [N]
    ids: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int):
        return self.inputs[i], int(self.labels[i])

    @property
    def targets(self) -> torch.Tensor:
        return self.labels

    def head(self, n: int | None) -> "Split":
        """The first n samples (all when n is None)."""
        if n is None:
            return self
        return Split(self.inputs[:n], self.labels[:n], self.ids[:n])


@dataclass
class DataSource:
    """A dataset opened for training: see the module docstring."""

    info: DatasetInfo
    train: torch.utils.data.Dataset
    train_plain: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    train_labels: torch.Tensor
    train_tensors: Split | None
    test_tensors: Split | None
    augment_batch: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None
    clean_labels: torch.Tensor | None = None
    variant: dict = field(default_factory=dict)
    #: int64 [N]: each training sample's index in the loader's full training split (set by open_dataset).
    train_index: torch.Tensor | None = None


# -- augmentation ----------------------------------------------------------------------------------


class RandomCropFlip:
    """Random crop of the image's own size from a zero-padded copy, then a horizontal flip with probability 1/2.

    Called on a batch `[N, C, H, W]` (any dtype; uint8 stays uint8) with an
    optional torch.Generator: vectorised, deterministic under a seeded
    generator. `item(x)` augments one `[C, H, W]` image with torch's global
    generator, which a DataLoader seeds differently in each worker.
    """

    def __init__(self, size: int, padding: int, flip: bool = True):
        if padding < 0:
            raise InvalidArgument(f"crop padding must be >= 0, got {padding}")
        self.size, self.padding, self.flip = int(size), int(padding), bool(flip)

    def describe(self) -> str:
        parts = [f"random crop {self.size} pad {self.padding}"] if self.padding else []
        if self.flip:
            parts.append("horizontal flip")
        return " + ".join(parts) or "none"

    def __repr__(self) -> str:
        return f"RandomCropFlip(size={self.size}, padding={self.padding}, flip={self.flip})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dim() != 4:
            raise InvalidArgument(f"augmentation takes a batch [N, C, H, W], got shape {tuple(x.shape)}")
        n, _, h, w = x.shape
        out = x
        if self.padding and n:
            p = self.padding
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
            # Every crop as a view [N, C, 2p+1, 2p+1, H, W]; one gather copies the chosen one per image.
            windows = padded.unfold(2, h, 1).unfold(3, w, 1)
            out = windows[torch.arange(n), :, dy, dx]
        if self.flip and n:
            flip = torch.rand(n, generator=generator) < 0.5
            out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        return out

    def item(self, x: torch.Tensor) -> torch.Tensor:
        return self(x.unsqueeze(0))[0]


# -- datasets that wrap others (all picklable, for DataLoader workers) ----------------------------


class AugmentedSplit(torch.utils.data.Dataset):
    """An in-memory split whose items are augmented (one at a time, torch's global generator)."""

    def __init__(self, split: Split, augment: Callable[[torch.Tensor, Any], torch.Tensor]):
        self.split, self.augment = split, augment

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        x = self.augment(self.split.inputs[i:i + 1], None)[0]
        return x, int(self.split.labels[i])

    @property
    def targets(self) -> torch.Tensor:
        return self.split.labels


class Augmented(torch.utils.data.Dataset):
    """Items of `base` with `augment.item` applied to the input."""

    def __init__(self, base, augment: RandomCropFlip):
        self.base, self.augment = base, augment

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i][:2]
        return self.augment.item(x), y

    @property
    def targets(self):
        return getattr(self.base, "targets", None)


class Remapped(torch.utils.data.Dataset):
    """Item i is `base[index[i]]`, with label `labels[i]` when labels are given (a subset, a variant)."""

    def __init__(self, base, index: torch.Tensor, labels: torch.Tensor | None = None):
        self.base, self.index = base, index.long()
        self.labels = None if labels is None else labels.long()

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, i: int):
        x, y = self.base[int(self.index[i])][:2]
        return x, (int(self.labels[i]) if self.labels is not None else y)

    @property
    def targets(self):
        if self.labels is not None:
            return self.labels
        base = getattr(self.base, "targets", None)
        return None if base is None else torch.as_tensor(base).long()[self.index]


class ToUint8:
    """A PIL image or array as a uint8 tensor `[C, H, W]` (grayscale: C=1; colour: C=3); tensors pass through."""

    def __call__(self, image):
        if isinstance(image, torch.Tensor):
            return image
        if isinstance(image, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(image))
            if t.dim() == 2:
                return t.unsqueeze(0)
            if t.dim() == 3 and t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3, 4):
                return t.permute(2, 0, 1).contiguous()
            return t
        mode = getattr(image, "mode", None)
        if mode is None:
            raise InvalidArgument(f"cannot turn a {type(image).__name__} into an image tensor; the dataset's items "
                                  "must be PIL images, arrays or tensors")
        if mode not in ("L", "RGB"):
            image = image.convert("L" if mode in GRAYSCALE_MODES else "RGB")
        array = np.asarray(image, dtype=np.uint8)
        t = torch.from_numpy(array.copy())
        return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


#: PIL modes read as one channel.
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"})


# -- the variants ------------------------------------------------------------------------------------


def generator_for(seed: int, purpose: str) -> torch.Generator:
    """A torch.Generator for one purpose ("imbalance", "label_noise", "subset"...), fixed by the seed.

    Each purpose gets its own stream, so adding label noise leaves the
    imbalanced subset unchanged, and so on.
    """
    digest = hashlib.sha256(f"{int(seed)}/{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def long_tail_counts(available: list[int], ratio: float) -> list[int]:
    """Per-class counts of an exponential long tail: n_c = n_max · ratio^(−c/(C−1)), rounded down.

    Class 0 is the largest and class C−1 the smallest (the profile of Cui et
    al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR
    2019). n_max is the largest value the available samples allow, so every
    class can fill its count; on a balanced set it is the class size.
    """
    c = len(available)
    if c < 2:
        raise InvalidArgument("class imbalance needs at least 2 classes")
    factors = [ratio ** (-k / (c - 1)) for k in range(c)]
    empty = [k for k, n in enumerate(available) if n == 0]
    if empty:
        raise InvalidArgument(f"class imbalance needs training samples of every class; classes {empty} have none "
                              "(use a larger --train-subset)")
    n_max = min(math.floor(n / f + 1e-9) for n, f in zip(available, factors))
    counts = [min(n, math.floor(n_max * f + 1e-9)) for n, f in zip(available, factors)]
    if counts[-1] < 1:
        raise InvalidArgument(f"--imbalance {ratio:g} leaves class {c - 1} with no samples (the largest class has "
                              f"{counts[0]}); lower the ratio or use more training samples")
    return counts


def imbalance_index(labels: torch.Tensor, num_classes: int, ratio: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """Positions (ascending) of the samples kept for a long tail of `ratio`, and the per-class counts."""
    labels = labels.long()
    available = torch.bincount(labels, minlength=num_classes).tolist()
    counts = long_tail_counts(available, ratio)
    kept = []
    for c, n in enumerate(counts):
        members = torch.nonzero(labels == c).flatten()
        order = torch.randperm(members.numel(), generator=generator)
        kept.append(members[order[:n]])
    index = torch.sort(torch.cat(kept)).values
    return index, counts


def symmetric_noise(labels: torch.Tensor, num_classes: int, rate: float,
                    generator: torch.Generator) -> torch.Tensor:
    """Symmetric label noise: each label independently, with probability `rate`, becomes a different class.

    The new class is drawn uniformly from the other C−1 classes, so `rate` is
    the noise rate: the expected share of labels that are wrong.
    """
    labels = labels.long()
    if num_classes < 2:
        raise InvalidArgument("label noise needs at least 2 classes")
    flip = torch.rand(labels.shape[0], generator=generator) < rate
    offset = torch.randint(1, num_classes, (labels.shape[0],), generator=generator)
    return torch.where(flip, (labels + offset) % num_classes, labels)


# -- the registry and open_dataset -----------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """`--data-dir`, else `$DATASELECT_DATA`, else `~/.cache/dataselect/data`."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return DEFAULT_DATA_DIR.expanduser()


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`NAME` or `NAME:ARGUMENT` -> (name, argument or None)."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidArgument(f"a dataset spec is NAME or NAME:ARGUMENT (known: {', '.join(dataset_names())}); "
                              f"got {spec!r}")
    name, sep, argument = spec.strip().partition(":")
    return name, (argument if sep else None)


def dataset_names() -> list[str]:
    """The registered datasets, those that take an argument shown as NAME:ARGUMENT (`imagefolder:DIR`)."""
    return [registry._dataset_label(name, reg.obj) for name, reg in registry.datasets().items()]


def _loader_for(spec: str) -> tuple[str, str | None, Callable]:
    name, argument = parse_spec(spec)
    loader = registry.get_dataset_loader(name)
    metavar = getattr(loader, "argument", None)
    if metavar and not argument:
        raise InvalidArgument(f"dataset {name!r} needs an argument: --dataset {name}:{metavar}")
    if not metavar and argument is not None:
        raise InvalidArgument(f"dataset {name!r} takes no argument (got {argument!r}); use --dataset {name}")
    return name, argument, loader


def check_dataset_spec(spec: str) -> None:
    """Validate a dataset spec without loading data (for CLIs): the name, the argument, the loader's own check."""
    _, argument, loader = _loader_for(spec)
    check = getattr(loader, "check", None)
    if check is not None:
        check(argument)


def _check_options(train_subset, test_subset, label_noise, imbalance) -> None:
    for flag, n in (("--train-subset", train_subset), ("--test-subset", test_subset)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise InvalidArgument(f"{flag} must be an integer >= 1, got {n!r}")
    if not (isinstance(label_noise, (int, float)) and 0.0 <= label_noise <= 1.0):
        raise InvalidArgument(f"--label-noise is the share of training labels made wrong, in [0, 1]; "
                              f"got {label_noise!r}")
    if not (isinstance(imbalance, (int, float)) and math.isfinite(imbalance) and imbalance >= 1.0):
        raise InvalidArgument(f"--imbalance is the ratio of the largest to the smallest class, >= 1 (1: as is); "
                              f"got {imbalance!r}")


def open_dataset(spec: str, data_dir: str | os.PathLike | None = None, *, download: bool = True,
                 train_subset: int | None = None, test_subset: int | None = None, seed: int = 0,
                 augment: bool = True, label_noise: float = 0.0, imbalance: float = 1.0) -> DataSource:
    """Open a registered dataset, then take subsets and apply the variants.

    spec: `NAME` or `NAME:ARGUMENT` (see `dataset_names()`).
    data_dir: where the files are (`--data-dir`, else `$DATASELECT_DATA`, else `~/.cache/dataselect/data`).
    train_subset / test_subset: for datasets held in memory the first N
        samples (the trainer's behaviour, so selections stay comparable); for
        lazily loaded ones a random N fixed by `seed` (an ImageFolder is
        sorted by class, so its first N would be one class).
    seed: fixes everything random here (and in the loader: synthetic data,
        held-out test splits, the mean/std sample).
    augment: the dataset's standard training augmentation (`info.augmentation`
        says which); False turns it off.
    imbalance: R > 1 keeps a long-tailed subset of the training split, the
        largest class R times the smallest, counts n_c = n_max · R^(−c/(C−1))
        over class indices c (Cui et al., CVPR 2019); which samples are kept is
        seeded.
    label_noise: P > 0 gives symmetric label noise: each training sample
        independently, with probability P, gets a label drawn uniformly from
        the other classes, so P is the noise rate. `train_labels` are the
        noisy labels, `clean_labels` the original ones.
    Imbalance is applied first, then noise; the test split is never changed.
    """
    _check_options(train_subset, test_subset, label_noise, imbalance)
    name, argument, loader = _loader_for(spec)
    root = resolve_data_dir(data_dir)
    source = loader(root=root, argument=argument, download=bool(download), seed=int(seed), augment=bool(augment))
    _validate(name, source)
    info = dataclasses.replace(source.info, name=spec)
    if info.mean is None or info.std is None:
        stats = estimate_mean_std(source.train_plain, seed)
        if stats is not None:
            info = dataclasses.replace(info, mean=stats[0], std=stats[1])
    in_memory = source.train_tensors is not None

    n_train, n_test = len(source.train_labels), len(source.test)
    for flag, n, total, label in (("--train-subset", train_subset, n_train, "training"),
                                  ("--test-subset", test_subset, n_test, "test")):
        if n is not None and n > total:
            raise InvalidArgument(f"{flag} {n} is larger than the {label} split of {spec} ({total} samples)")

    index = torch.arange(n_train)
    if train_subset is not None:
        index = index[:train_subset] if in_memory else _random_subset(n_train, train_subset, seed, "train_subset")
    labels = source.train_labels.long()[index]
    variant: dict = {}
    if imbalance > 1.0:
        keep, counts = imbalance_index(labels, info.num_classes, float(imbalance), generator_for(seed, "imbalance"))
        index, labels = index[keep], labels[keep]
        variant.update(imbalance=float(imbalance), class_counts=counts,
                       kept_sha256=hashlib.sha256(index.numpy().astype("<i8").tobytes()).hexdigest())
    clean = None
    if label_noise > 0.0:
        clean = labels
        labels = symmetric_noise(labels, info.num_classes, float(label_noise), generator_for(seed, "label_noise"))
        variant.update(label_noise=float(label_noise), noisy=int((labels != clean).sum()))
    if variant:
        variant["seed"] = int(seed)
    train_changed = bool(variant) or train_subset is not None

    test_index = None
    if test_subset is not None:
        test_index = (torch.arange(test_subset) if in_memory
                      else _random_subset(n_test, test_subset, seed, "test_subset"))

    out = dataclasses.replace(source, info=info, train_labels=labels, clean_labels=clean, variant=variant,
                              train_index=index)
    if in_memory:
        full = source.train_tensors
        if train_changed:
            # A plain subset is the first N (views, as the trainer has always taken them); a variant gathers.
            inputs = full.inputs[index] if variant else full.inputs[:index.numel()]
            split = Split(inputs, labels, torch.arange(index.numel()))
            out.train_tensors = split
            out.train_plain = split
            out.train = AugmentedSplit(split, source.augment_batch) if source.augment_batch is not None else split
    elif train_changed:
        out.train = Remapped(source.train, index, labels)
        out.train_plain = Remapped(source.train_plain, index, labels)
    if test_index is not None:
        if source.test_tensors is not None:
            out.test_tensors = source.test_tensors.head(test_subset)
            out.test = out.test_tensors
        else:
            out.test = Remapped(source.test, test_index)
    return out


def _random_subset(total: int, n: int, seed: int, purpose: str) -> torch.Tensor:
    return torch.sort(torch.randperm(total, generator=generator_for(seed, purpose))[:n]).values


def _validate(name: str, source: Any) -> None:
    registered = registry.datasets()
    plugin = registered[name].plugin if name in registered else "?"
    where = f"dataset {name!r} (plugin {plugin!r})"
    if not isinstance(source, DataSource):
        raise PluginError(f"{where}: the loader returned {type(source).__name__}, not a dataselect.datasets.DataSource")
    labels = source.train_labels
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point:
        raise PluginError(f"{where}: train_labels must be an integer tensor [N]")
    if len(source.train) != labels.shape[0] or len(source.train_plain) != labels.shape[0]:
        raise PluginError(f"{where}: train ({len(source.train)}), train_plain ({len(source.train_plain)}) and "
                          f"train_labels ({labels.shape[0]}) must have the same length")
    if labels.numel() == 0:
        raise PluginError(f"{where}: the training split is empty")
    if source.info.num_classes < 1 or int(labels.min()) < 0 or int(labels.max()) >= source.info.num_classes:
        raise PluginError(f"{where}: training labels must lie in [0, num_classes={source.info.num_classes}); "
                          f"found {int(labels.min())}..{int(labels.max())}")
    if source.train_tensors is not None and len(source.train_tensors) != labels.shape[0]:
        raise PluginError(f"{where}: train_tensors and train_labels differ in length")


def estimate_mean_std(dataset, seed: int, limit: int = STATS_SAMPLE
                      ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Per-channel mean and std in [0, 1] units from a seeded sample of at most `limit` uint8 images.

    None when the items are not uint8 images `[C, H, W]` (nothing to normalise by).
    """
    n = len(dataset)
    if n == 0:
        return None
    first = dataset[0][0]
    if not (isinstance(first, torch.Tensor) and first.dtype == torch.uint8 and first.dim() == 3):
        return None
    picks = torch.sort(torch.randperm(n, generator=generator_for(seed, "stats"))[:limit]).values
    channels = first.shape[0]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for i in picks.tolist():
        x = dataset[i][0].to(torch.float64).div_(255).flatten(1)
        total += x.sum(1)
        squares += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std < 1e-6, torch.ones_like(std), std)  # a blank channel: do not divide by zero
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def accepts_standard_arguments(cls: type) -> bool:
    """Whether a dataset class takes torchvision's standard `root`, `train`, `transform`, `download` arguments."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    if "root" not in params or "train" not in params:
        return False
    kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return all(name in params or kwargs for name in ("transform", "download"))
