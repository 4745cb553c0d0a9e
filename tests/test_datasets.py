"""dataselect.datasets: the register_datasets hook, the built-in datasets (in memory, ImageFolder,
torchvision classes), DataLoader workers over lazy datasets, augmentation, and the noisy and
imbalanced variants.

ImageFolders and CIFAR-format batch files are generated here; real MNIST is used where the shared
data folder has it (skipped otherwise).
"""

from __future__ import annotations

import hashlib
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataselect
from dataselect import plugins as registry
from dataselect.datasets import (
    DatasetInfo,
    DataSource,
    RandomCropFlip,
    Split,
    ToUint8,
    check_dataset_spec,
    dataset_names,
    generator_for,
    imbalance_index,
    long_tail_counts,
    open_dataset,
    symmetric_noise,
)
from dataselect.errors import InvalidArgument, NotFound, PluginError

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "datasets"
HAVE_MNIST = (MNIST_DIR / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason="real MNIST is not in ../shared/datasets")


# -- fixtures: an ImageFolder and CIFAR-format batch files -----------------------------------------------


def _png(path: Path, size: tuple[int, int], colour, mode: str = "RGB", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    channels = 3 if mode == "RGB" else 1
    base = np.array(colour, dtype=np.float64).reshape(1, 1, -1)[..., :channels]
    pixels = np.clip(base + rng.integers(-40, 41, size=(h, w, channels)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(path)


COLOURS = {"cat": (200, 60, 60), "dog": (60, 200, 60), "eel": (60, 60, 200)}


def make_imagefolder(root: Path, *, split: bool = True, n_train: int = 8, n_test: int = 2, mode: str = "RGB") -> Path:
    """3 classes; most images 24x24, some 36x24 and 20x30 (mixed sizes)."""
    k = 0
    for name, colour in COLOURS.items():
        for i in range(n_train + (0 if split else n_test)):
            size = (36, 24) if i % 4 == 1 else (20, 30) if i % 4 == 2 else (24, 24)
            sub = root / "train" / name if split else root / name
            _png(sub / f"{i:03d}.png", size, colour, mode, seed=k)
            k += 1
        if split:
            for i in range(n_test):
                _png(root / "test" / name / f"{i:03d}.png", (24, 24), colour, mode, seed=k)
                k += 1
    return root


@pytest.fixture
def pets(tmp_path) -> Path:
    return make_imagefolder(tmp_path / "pets")


def make_cifar(root: Path, per_batch: int = 12, n_test: int = 10) -> dict:
    """The cifar-10-batches-py layout: pickled dicts of numpy uint8 [N, 3072] and a label list."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {"train": [], "train_labels": [], "test": None, "test_labels": None}

    def batch(path: Path, n: int):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        entry = {"batch_label": path.name, "labels": labels, "data": data,
                 "filenames": [f"img{i}.png" for i in range(n)]}
        path.write_bytes(pickle.dumps(entry, protocol=2))
        return data, labels

    for i in range(1, 6):
        data, labels = batch(folder / f"data_batch_{i}", per_batch)
        written["train"].append(data)
        written["train_labels"] += labels
    written["test"], written["test_labels"] = batch(folder / "test_batch", n_test)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
            "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    written["train"] = np.concatenate(written["train"])
    return written


def _as_image(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data).reshape(-1, 3, 32, 32)


# -- the registry and the hook ---------------------------------------------------------------------------


def test_builtin_datasets_are_registered_through_the_hook():
    names = dataset_names()
    assert {"mnist", "cifar10", "synthetic", "imagefolder:DIR", "torchvision:CLASS"} <= set(names)
    assert all(r.plugin == "dataselect.plugins.builtin_datasets" for r in registry.datasets().values()
               if r.plugin.startswith("dataselect."))
    rows = {row["name"]: row for row in registry.plugins()}
    assert rows["dataselect.plugins.builtin_datasets"]["hooks"] == ["register_datasets"]


def test_an_unknown_dataset_lists_the_known_ones():
    for call in (lambda: open_dataset("cifar11"), lambda: check_dataset_spec("cifar11"),
                 lambda: registry.get_dataset_loader("cifar11")):
        with pytest.raises(InvalidArgument, match="unknown dataset 'cifar11'.*known datasets:.*imagefolder:DIR") as e:
            call()
        assert "torchvision:CLASS" in str(e.value) and "synthetic" in str(e.value)


def test_arguments_are_required_or_refused_with_the_fix():
    with pytest.raises(InvalidArgument, match=r"needs an argument: --dataset imagefolder:DIR"):
        check_dataset_spec("imagefolder")
    with pytest.raises(InvalidArgument, match=r"takes no argument .*use --dataset mnist"):
        open_dataset("mnist:digits")
    with pytest.raises(InvalidArgument,
                       match="NoSuchSet is not a torchvision dataset; classes that work here:.*FashionMNIST"):
        check_dataset_spec("torchvision:NoSuchSet")
    # SVHN exists but takes split= instead of train=: the message says to register it through the hook
    with pytest.raises(InvalidArgument,
                       match="does not take the standard root/train/transform/download.*register_datasets"):
        check_dataset_spec("torchvision:SVHN")
    with pytest.raises(NotFound, match="no folder .*train/<class>"):
        check_dataset_spec("imagefolder:/nonexistent/dataselect-test-folder")
    check_dataset_spec("synthetic")
    check_dataset_spec("torchvision:fashionmnist")  # case-insensitive class names
    with pytest.raises(InvalidArgument, match="NAME or NAME:ARGUMENT"):
        check_dataset_spec("")


def test_bad_options_name_the_fix():
    with pytest.raises(InvalidArgument, match=r"--label-noise .* in \[0, 1\]"):
        open_dataset("synthetic", label_noise=1.5)
    with pytest.raises(InvalidArgument, match=r"--imbalance .* >= 1"):
        open_dataset("synthetic", imbalance=0.5)
    with pytest.raises(InvalidArgument, match="--train-subset must be an integer >= 1"):
        open_dataset("synthetic", train_subset=0)
    with pytest.raises(InvalidArgument, match="--test-subset 501 is larger than the test split of synthetic"):
        open_dataset("synthetic", test_subset=501)


class _VectorPlugin:
    """An in-test plugin: a non-image dataset held in memory, and one that takes an argument."""

    def __init__(self):
        self.calls = []

    @dataselect.hookimpl
    def register_datasets(self, register):
        def load_vectors(*, root, argument, download, seed, augment):
            self.calls.append({"root": root, "argument": argument, "seed": seed, "augment": augment})
            gen = torch.Generator().manual_seed(seed)
            k = int(argument)
            x = torch.randn(300, 6, generator=gen)
            y = torch.arange(300) % k
            train = Split(x[:200], y[:200], torch.arange(200))
            test = Split(x[200:], y[200:], torch.arange(100))
            info = DatasetInfo("vectors", k, (6,), None, None)
            return DataSource(info, train, train, test, train.labels, train, test, None)

        load_vectors.argument = "K"
        register("test-vectors", load_vectors)
        register("test-broken", lambda **kw: "not a data source")


def test_a_plugin_registers_a_dataset_and_open_dataset_applies_subset_and_variants(tmp_path):
    plugin = _VectorPlugin()
    registry.register_plugin(plugin, name="test-vectors-plugin")
    try:
        assert "test-vectors:K" in dataset_names()
        assert registry.datasets()["test-vectors"].plugin == "test-vectors-plugin"
        source = open_dataset("test-vectors:4", tmp_path, seed=3, train_subset=120, label_noise=0.5, augment=False)
        assert plugin.calls[-1] == {"root": tmp_path, "argument": "4", "seed": 3, "augment": False}
        assert source.info.name == "test-vectors:4" and source.info.mean is None  # not images: nothing to estimate
        # held in memory: the subset is the first 120, ids are positions
        assert len(source.train) == 120 and torch.equal(source.train_index, torch.arange(120))
        assert torch.equal(source.train_tensors.ids, torch.arange(120))
        assert torch.equal(source.clean_labels, torch.arange(120) % 4)
        assert torch.equal(source.train_tensors.labels, source.train_labels)
        assert source.variant["noisy"] == int((source.train_labels != source.clean_labels).sum()) > 0
        with pytest.raises(InvalidArgument, match=r"shape \(6,\), not images .*register_models"):
            source.info.model_kwargs()
        with pytest.raises(PluginError, match=r"'test-broken' \(plugin 'test-vectors-plugin'\)"
                                              ".*not a dataselect.datasets.DataSource"):
            open_dataset("test-broken")
    finally:
        registry.unregister_plugin("test-vectors-plugin")
    with pytest.raises(InvalidArgument, match="unknown dataset 'test-vectors'"):
        open_dataset("test-vectors:4")


def test_a_taken_or_invalid_dataset_name_is_refused_naming_both_plugins():
    class Clash:
        @dataselect.hookimpl
        def register_datasets(self, register):
            register("mnist", lambda **kw: None)

    class BadName:
        @dataselect.hookimpl
        def register_datasets(self, register):
            register("my:data", lambda **kw: None)

    with pytest.raises(InvalidArgument, match="dataset name 'mnist' registered twice: by "
                                              "'dataselect.plugins.builtin_datasets' and by 'test-clash'"):
        registry.register_plugin(Clash(), name="test-clash")
    with pytest.raises(InvalidArgument, match="must be letters, digits"):
        registry.register_plugin(BadName(), name="test-badname")
    assert registry.datasets()["mnist"].plugin == "dataselect.plugins.builtin_datasets"
    assert "test-clash" not in {row["name"] for row in registry.plugins()}


# -- the in-memory built-ins ----------------------------------------------------------------------------


def test_cifar10_reads_the_batch_files_with_crop_and_flip(tmp_path):
    written = make_cifar(tmp_path)
    source = open_dataset("cifar10", tmp_path, download=False)
    assert torch.equal(source.train_tensors.inputs, _as_image(written["train"]))
    assert source.train_labels.tolist() == written["train_labels"]
    assert torch.equal(source.test_tensors.inputs, _as_image(written["test"]))
    assert source.info.input_shape == (3, 32, 32) and source.info.num_classes == 10
    assert source.info.augmentation == "random crop 32 pad 4 + horizontal flip"
    assert source.info.model_kwargs()["image_size"] == 32
    # the batch augmentation and the per-item one change images, and keep shape and dtype
    batch = source.train_tensors.inputs[:16]
    out = source.augment_batch(batch, torch.Generator().manual_seed(1))
    assert out.shape == batch.shape and out.dtype == torch.uint8 and not torch.equal(out, batch)
    items = torch.stack([source.train[i][0] for i in range(16)])
    assert items.dtype == torch.uint8 and not torch.equal(items, batch)
    assert torch.equal(torch.stack([source.train_plain[i][0] for i in range(16)]), batch)
    plain = open_dataset("cifar10", tmp_path, download=False, augment=False)
    assert plain.augment_batch is None and plain.info.augmentation == "none" and plain.train is plain.train_plain


def test_cifar10_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(NotFound, match=r"put the files at .*cifar-10-batches-py.*--download"):
        open_dataset("cifar10", tmp_path, download=False)


def test_cifar10_batch_files_cannot_run_code(tmp_path):
    make_cifar(tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({"data": Payload()}, protocol=2))
    with pytest.raises(InvalidArgument, match="data_batch_3 is not a CIFAR batch file.*only numpy arrays"):
        open_dataset("cifar10", tmp_path, download=False)
    assert not marker.exists()


# -- imagefolder ----------------------------------------------------------------------------------------


def test_imagefolder_reads_classes_sizes_and_statistics(pets):
    source = open_dataset(f"imagefolder:{pets}", augment=False)
    info = source.info
    assert info.num_classes == 3 and info.input_shape == (3, 24, 24)  # the most common size
    assert source.train_tensors is None and source.augment_batch is None
    assert len(source.train) == 24 and len(source.test) == 6
    assert source.train_labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8  # sorted class names: cat, dog, eel
    xs = torch.stack([source.train_plain[i][0] for i in range(len(source.train_plain))])
    assert xs.dtype == torch.uint8 and xs.shape == (24, 3, 24, 24)
    # fewer than 1,000 images: the estimate covers them all
    pixels = xs.double().div(255).transpose(0, 1).flatten(1)
    assert info.mean == pytest.approx(pixels.mean(1).tolist(), abs=1e-4)
    assert info.std == pytest.approx(pixels.std(1, unbiased=False).tolist(), abs=1e-4)
    assert info.model_kwargs()["in_channels"] == 3
    # each class's colour survives decoding (the dominant channel is the class's)
    for x, y in zip(xs, source.train_labels):
        assert int(x.double().mean((1, 2)).argmax()) == int(y)
    assert [int(source.test[i][1]) for i in range(6)] == [0, 0, 1, 1, 2, 2]


def test_imagefolder_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    stripes = np.zeros((24, 36, 3), dtype=np.uint8)
    stripes[:, :6] = (255, 0, 0)
    stripes[:, 6:30] = (0, 255, 0)
    stripes[:, 30:] = (0, 0, 255)
    for name in ("a", "b"):
        for i in range(3):
            _png(tmp_path / "f" / "train" / name / f"{i}.png", (24, 24), (9, 9, 9))
        _png(tmp_path / "f" / "test" / name / "0.png", (24, 24), (9, 9, 9))
    Image.fromarray(stripes).save(tmp_path / "f" / "train" / "a" / "wide.png")
    tall = np.ascontiguousarray(np.transpose(stripes, (1, 0, 2)) // 2)  # 36 high, 24 wide, upscaled to 24 sides
    Image.fromarray(np.kron(tall, np.ones((2, 2, 1), dtype=np.uint8))).save(tmp_path / "f" / "train" / "b" / "tall.png")
    source = open_dataset(f"imagefolder:{tmp_path / 'f'}", augment=False)
    paths = source.train_plain.paths
    wide = source.train_plain[paths.index(str(tmp_path / "f" / "train" / "a" / "wide.png"))][0]
    green = torch.tensor([0, 255, 0], dtype=torch.uint8)[:, None, None].expand(3, 24, 24)
    assert wide.shape == (3, 24, 24) and torch.equal(wide, green)  # the red and blue side bands are cropped off
    tall_x = source.train_plain[paths.index(str(tmp_path / "f" / "train" / "b" / "tall.png"))][0]
    assert tall_x.shape == (3, 24, 24)
    # halved to 24 x 36, the 24 central rows kept: green, with only a bilinear blend at the first and last row
    assert (tall_x[1, 1:-1] == 127).all() and tall_x[0].max() < 32 and tall_x[2].max() < 32


def test_imagefolder_grayscale_and_a_folder_without_train_holds_out_ten_percent(tmp_path):
    folder = make_imagefolder(tmp_path / "gray", split=False, n_train=18, n_test=2, mode="L")
    a = open_dataset(f"imagefolder:{folder}", seed=0)
    assert a.info.input_shape == (1, 24, 24) and a.info.augmentation == "random crop 24 pad 3 + horizontal flip"
    assert len(a.train) + len(a.test) == 60 and len(a.test) == 6
    train_paths, test_paths = set(a.train_plain.paths), set(a.test.paths)
    assert not train_paths & test_paths and len(train_paths | test_paths) == 60
    assert test_paths == set(open_dataset(f"imagefolder:{folder}", seed=0).test.paths)  # fixed by the seed
    assert test_paths != set(open_dataset(f"imagefolder:{folder}", seed=1).test.paths)
    assert a.train[0][0].shape == (1, 24, 24)


def test_imagefolder_relative_to_the_data_dir(pets):
    source = open_dataset("imagefolder:pets", pets.parent)
    assert source.info.name == "imagefolder:pets" and len(source.train) == 24


def test_imagefolder_errors_say_where_to_put_images(tmp_path):
    with pytest.raises(NotFound, match=r"no folder .* put the images at DIR/train/<class>/<image>"):
        open_dataset("imagefolder:missing-folder", tmp_path)
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(NotFound, match=r"no images under .*train.*<class>/<image>"):
        open_dataset(f"imagefolder:{tmp_path / 'empty'}")
    make_imagefolder(tmp_path / "odd")
    _png(tmp_path / "odd" / "test" / "yak" / "0.png", (24, 24), (1, 2, 3))
    with pytest.raises(InvalidArgument, match=r"classes with no training images: \['yak'\]"):
        open_dataset(f"imagefolder:{tmp_path / 'odd'}")
    make_imagefolder(tmp_path / "broken")
    (tmp_path / "broken" / "train" / "cat" / "000.png").write_bytes(b"not a png")
    with pytest.raises(InvalidArgument, match=r"cannot read image .*000.png.*replace or remove the file"):
        open_dataset(f"imagefolder:{tmp_path / 'broken'}")


def test_lazy_subsets_are_seeded_random_not_the_first_n(pets):
    a = open_dataset(f"imagefolder:{pets}", train_subset=12, test_subset=3, seed=0)
    b = open_dataset(f"imagefolder:{pets}", train_subset=12, test_subset=3, seed=0)
    c = open_dataset(f"imagefolder:{pets}", train_subset=12, test_subset=3, seed=1)
    assert torch.equal(a.train_index, b.train_index) and not torch.equal(a.train_index, c.train_index)
    assert len(set(a.train_labels.tolist())) > 1  # the head of a sorted folder would be one class
    assert len(a.train) == len(a.train_plain) == 12 and len(a.test) == 3
    full = open_dataset(f"imagefolder:{pets}", augment=False)
    for i in range(12):  # id i is position i; train_index maps it back
        x, y = a.train_plain[i]
        assert torch.equal(x, full.train_plain[int(a.train_index[i])][0]) and y == int(a.train_labels[i])


# -- torchvision classes ----------------------------------------------------------------------------------


@needs_mnist
def test_torchvision_mnist_is_lazy_and_labels_come_from_targets(monkeypatch):
    decoded = []
    original = ToUint8.__call__

    def counting(self, image):
        decoded.append(1)
        return original(self, image)

    monkeypatch.setattr(ToUint8, "__call__", counting)
    source = open_dataset("torchvision:MNIST", MNIST_DIR, download=False)
    assert len(source.train) == 60000 and source.train_tensors is None
    assert len(decoded) < 1100  # the first sample (for shapes) and the mean/std sample, not 60,000 images
    info = source.info
    assert info.input_shape == (1, 28, 28) and info.num_classes == 10 and info.augmentation == "none"
    assert info.mean[0] == pytest.approx(0.1307, abs=0.01) and info.std[0] == pytest.approx(0.3081, abs=0.01)
    memory = open_dataset("mnist", MNIST_DIR, download=False)
    assert torch.equal(source.train_labels, memory.train_labels)
    for i in (0, 123, 59999):
        assert torch.equal(source.train[i][0], memory.train_tensors.inputs[i])


@needs_mnist
def test_dataloader_workers_over_torchvision_mnist_with_variants():
    source = open_dataset("torchvision:MNIST", MNIST_DIR, download=False, train_subset=400, label_noise=0.3, seed=2)
    loader = torch.utils.data.DataLoader(source.train, batch_size=100, num_workers=2)
    labels = torch.cat([y for _, y in loader])
    assert torch.equal(labels, source.train_labels) and not torch.equal(labels, source.clean_labels)


def test_torchvision_cifar10_class_gets_crop_and_flip(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    written = make_cifar(tmp_path)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # the generated files have no known md5
    source = open_dataset("torchvision:CIFAR10", tmp_path, download=False)
    assert source.info.augmentation == "random crop 32 pad 4 + horizontal flip"
    assert source.info.num_classes == 10 and source.info.input_shape == (3, 32, 32)
    assert source.train_labels.tolist() == written["train_labels"]
    images = _as_image(written["train"])
    assert all(torch.equal(source.train_plain[i][0], images[i]) for i in range(5))
    assert any(not torch.equal(source.train[i][0], images[i]) for i in range(10))
    loader = torch.utils.data.DataLoader(source.train, batch_size=20, num_workers=2)
    batches = list(loader)
    assert [tuple(x.shape) for x, _ in batches] == [(20, 3, 32, 32)] * 3 and batches[0][0].dtype == torch.uint8


def test_dataloader_workers_over_imagefolder_and_its_variants(pets):
    source = open_dataset(f"imagefolder:{pets}", train_subset=20, label_noise=0.5, seed=4)
    for dataset, labels in ((source.train, source.train_labels), (source.train_plain, source.train_labels),
                            (source.test, torch.tensor([0, 0, 1, 1, 2, 2]))):
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2)
        xs, ys = zip(*loader)
        assert torch.cat(xs).shape == (len(labels), 3, 24, 24) and torch.cat(xs).dtype == torch.uint8
        assert torch.equal(torch.cat(ys), labels)
    assert torch.equal(source.train_plain.targets, source.train_labels)


def test_missing_torchvision_files_say_where_to_put_them(tmp_path):
    with pytest.raises(NotFound, match=r"torchvision:FashionMNIST not found under .*put its files where "
                                       r"torchvision.datasets.FashionMNIST.*--download"):
        open_dataset("torchvision:FashionMNIST", tmp_path, download=False)


# -- augmentation -------------------------------------------------------------------------------------------


def _crops(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every crop of the zero-padded image and of its mirror."""
    c, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            out += [crop, crop.flip(-1)]
    return out


def test_random_crop_flip_is_a_seeded_crop_of_the_padded_image():
    x = torch.randint(0, 256, (32, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = RandomCropFlip(12, 2)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = sum(not torch.equal(a[i], x[i]) for i in range(32))
    assert changed >= 24  # 1 in 50 draws is the identity
    for i in range(32):
        assert any(torch.equal(a[i], crop) for crop in _crops(x[i], 2))
    assert RandomCropFlip(12, 0)(x, torch.Generator().manual_seed(3)).shape == x.shape
    assert aug.describe() == "random crop 12 pad 2 + horizontal flip"
    assert aug.item(x[0]).shape == (3, 12, 12)


def test_flips_happen_half_the_time():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.uint8).reshape(2, 1, 2, 3).repeat(500, 1, 1, 1)
    out = RandomCropFlip(3, 0)(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]).float().mean()
    assert 0.45 < float(flipped) < 0.55


# -- variants -----------------------------------------------------------------------------------------------


def test_symmetric_noise_rate_and_never_the_true_class():
    labels = torch.arange(20000) % 10
    noisy = symmetric_noise(labels, 10, 0.3, torch.Generator().manual_seed(0))
    flipped = noisy != labels
    # 0.3 is the noise rate: drawing from all ten classes would give 0.27
    assert abs(float(flipped.float().mean()) - 0.3) < 0.015
    # the wrong labels are spread evenly over the nine other classes
    for c in range(10):
        wrong = noisy[(labels == c) & flipped]
        assert c not in wrong.tolist()
        counts = torch.bincount(wrong, minlength=10).float()
        others = torch.cat([counts[:c], counts[c + 1:]])
        assert float(others.min()) > 0.6 * float(others.mean())
    assert torch.equal(noisy, symmetric_noise(labels, 10, 0.3, torch.Generator().manual_seed(0)))


def test_label_noise_on_a_dataset_keeps_the_clean_labels():
    plain = open_dataset("synthetic", seed=1)
    noisy = open_dataset("synthetic", seed=1, label_noise=0.2)
    again = open_dataset("synthetic", seed=1, label_noise=0.2)
    other = open_dataset("synthetic", seed=2, label_noise=0.2)
    assert torch.equal(noisy.clean_labels, plain.train_labels)
    assert torch.equal(noisy.train_tensors.inputs, plain.train_tensors.inputs)  # same samples, same ids
    wrong = int((noisy.train_labels != noisy.clean_labels).sum())
    assert noisy.variant == {"label_noise": 0.2, "noisy": wrong, "seed": 1}
    assert abs(wrong / 2000 - 0.2) < 0.04
    assert torch.equal(noisy.train_labels, again.train_labels)
    assert not torch.equal(other.train_labels != other.clean_labels, noisy.train_labels != noisy.clean_labels)
    assert [noisy.train[i][1] for i in range(50)] == noisy.train_labels[:50].tolist()
    assert torch.equal(noisy.test_tensors.labels, plain.test_tensors.labels)  # the test split is never changed
    assert plain.clean_labels is None and plain.variant == {}


def test_long_tail_counts_follow_the_exponential_profile():
    counts = long_tail_counts([1000] * 10, 10.0)
    assert counts[0] == 1000 and counts[-1] == 100
    assert counts == [math.floor(1000 * 10 ** (-c / 9) + 1e-9) for c in range(10)]
    assert all(a > b for a, b in zip(counts, counts[1:]))
    # an unbalanced start: n_max is what every class can fill
    uneven = long_tail_counts([50, 400, 400], 4.0)
    assert uneven[0] <= 50 and uneven[-1] == math.floor(uneven[0] / 4 + 1e-9)
    with pytest.raises(InvalidArgument, match="lower the ratio"):
        long_tail_counts([10] * 5, 20.0)
    with pytest.raises(InvalidArgument, match=r"classes \[2\] have none"):
        long_tail_counts([10, 10, 0], 2.0)


def test_imbalance_on_a_dataset_is_exact_seeded_and_renumbers_ids():
    full = open_dataset("synthetic", seed=0)
    a = open_dataset("synthetic", seed=0, imbalance=10)
    counts = torch.bincount(a.train_labels, minlength=10).tolist()
    assert counts == a.variant["class_counts"]
    assert max(counts) == counts[0] and min(counts) == counts[-1]
    assert counts[-1] == math.floor(counts[0] / 10 + 1e-9)  # the ratio, exact to rounding
    assert counts[0] == int(torch.bincount(full.train_labels, minlength=10)[0]) or counts[0] < 200
    assert torch.equal(a.train_tensors.ids, torch.arange(sum(counts)))
    assert torch.equal(a.train_tensors.inputs, full.train_tensors.inputs[a.train_index])
    assert torch.equal(a.train_labels, full.train_labels[a.train_index])
    assert a.variant["kept_sha256"] == hashlib.sha256(a.train_index.numpy().astype("<i8").tobytes()).hexdigest()
    b = open_dataset("synthetic", seed=0, imbalance=10)
    c = open_dataset("synthetic", seed=0, imbalance=10, label_noise=0.1)  # noise does not move the kept samples
    d = open_dataset("synthetic", seed=3, imbalance=10)
    assert torch.equal(a.train_index, b.train_index) and torch.equal(a.train_index, c.train_index)
    assert torch.equal(c.clean_labels, a.train_labels) and c.variant["imbalance"] == 10.0
    assert c.variant["noisy"] == int((c.train_labels != c.clean_labels).sum())
    assert not torch.equal(d.train_index, open_dataset("synthetic", seed=3).train_index[: d.train_index.numel()])
    with pytest.raises(InvalidArgument, match="lower the ratio or use more training samples"):
        open_dataset("synthetic", seed=0, train_subset=40, imbalance=50)


def test_imbalance_index_keeps_a_seeded_sorted_subset_per_class():
    labels = torch.arange(300) % 3
    index, counts = imbalance_index(labels, 3, 4.0, generator_for(0, "imbalance"))
    assert counts == [100, 50, 25] and index.numel() == 175
    assert torch.equal(index, torch.sort(index).values)
    assert torch.bincount(labels[index]).tolist() == counts


def test_a_lazy_dataset_with_both_variants(pets):
    source = open_dataset(f"imagefolder:{pets}", imbalance=4, label_noise=0.25, seed=0)
    assert source.variant["class_counts"] == [8, 4, 2] and len(source.train) == 14
    assert torch.equal(source.clean_labels, torch.tensor([0] * 8 + [1] * 4 + [2] * 2))
    assert [source.train[i][1] for i in range(14)] == source.train_labels.tolist()
    assert [source.train_plain[i][1] for i in range(14)] == source.train_labels.tolist()


def test_model_kwargs_refuse_non_square_images():
    info = DatasetInfo("wide", 3, (3, 24, 32), (0.5,) * 3, (0.2,) * 3)
    with pytest.raises(InvalidArgument, match="non-square images .*resize or crop them to a square"):
        info.model_kwargs()
    assert DatasetInfo("sq", 3, (3, 24, 24), (0.5,) * 3, (0.2,) * 3).model_kwargs()["image_size"] == 24


def test_sources_plug_into_the_selection_loaders_data_views(pets):
    loader = pytest.importorskip("dataselect.client.loader")
    memory = open_dataset("synthetic", train_subset=64, label_noise=0.5)
    data = loader.as_data(memory.train_tensors, augment=memory.augment_batch)
    assert isinstance(data, loader.TensorData) and torch.equal(data.labels, memory.train_labels)
    lazy = open_dataset(f"imagefolder:{pets}", label_noise=0.5)
    data = loader.as_data(lazy.train, plain=lazy.train_plain, labels=lazy.train_labels, num_workers=2)
    assert isinstance(data, loader.LoaderData) and torch.equal(data.labels, lazy.train_labels)
    x, y, ids = data.fetch(torch.tensor([3, 17]))
    assert x.shape == (2, 3, 24, 24) and torch.equal(y, lazy.train_labels[[3, 17]]) and ids.tolist() == [3, 17]


def test_lazy_datasets_pickle_for_spawned_workers(pets, tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    make_cifar(tmp_path / "c")
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    folder = open_dataset(f"imagefolder:{pets}", train_subset=10, test_subset=4, label_noise=0.3, imbalance=2)
    cifar = open_dataset("torchvision:CIFAR10", tmp_path / "c", download=False, train_subset=20)
    for source in (folder, cifar):
        for dataset in (source.train, source.train_plain, source.test):
            copy = pickle.loads(pickle.dumps(dataset))
            assert len(copy) == len(dataset)
            assert torch.equal(copy[1][0], dataset[1][0]) or dataset is source.train  # train is augmented
            assert copy[1][1] == dataset[1][1]
