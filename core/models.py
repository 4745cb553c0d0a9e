"""The model registry and the model protocol every registered model follows.

Protocol (what the signals engine relies on):
* `model(x)` takes images as stored — uint8 `[N, C, H, W]` (scaled to [0, 1]
  inside) or float in [0, 1] — and returns logits `[N, num_classes]`;
  normalisation by the dataset's mean/std happens inside the model, so the
  trainer and the scoring server can never disagree about it.
* `model.features(x)` returns the penultimate features `h` `[N, D]`.
* `model.classifier` is the final `nn.Linear`, so `model(x) == classifier(features(x))`.
* Optional: the builder's `slim_kwargs(kwargs, ratio)` returns the kwargs of a
  narrower twin whose every tensor is a leading slice of the full model's
  (the parameter-sharing proxy, `dataselect.proxy`; mixin `Slimmable`).

Architectures are registered through the `register_models` hook (the
built-ins in `dataselect.plugins.builtin_models`); `build_model(name, **kw)`
is the one factory.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dataselect.errors import InvalidArgument


class Normalize(nn.Module):
    """uint8 or [0, 1] float images -> (x - mean) / std, as float32."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_unit_float(x)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1]; float images pass through."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise InvalidArgument(f"model inputs must be uint8 or floating point, got {x.dtype}")
    return x


class Classifier(nn.Module):
    """Base for registered models: normalise -> body -> features -> classifier."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)

    def body(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _flat_size(module: nn.Module, in_channels: int, image_size: int) -> int:
    with torch.no_grad():
        return int(module(torch.zeros(1, in_channels, image_size, image_size)).flatten(1).shape[1])


class Slimmable:
    """Mixin for models with a parameter-sharing sub-network (DynaMS's proxy, `dataselect.proxy`).

    `slim_widths` names the builder arguments that set layer widths; the slim
    twin scales each by the ratio. The architecture must be such that every
    tensor of the slim model is the leading slice of the full model's (true
    when widths only set channel/unit counts and flattening is channel-major).
    """

    slim_widths: tuple[str, ...] = ()

    @classmethod
    def slim_kwargs(cls, kwargs: dict, ratio: float) -> dict:
        """The builder kwargs of the same architecture with `ratio` of each width (at least 2)."""
        import inspect

        params = inspect.signature(cls).parameters
        out = dict(kwargs)
        for name in cls.slim_widths:
            full = int(kwargs.get(name, params[name].default))
            out[name] = min(full, max(2, round(full * ratio)))
        return out


class SmallCNN(Slimmable, Classifier):
    """Two conv layers (the seed's shallow CNN)."""

    slim_widths = ("width", "hidden")

    def __init__(self, num_classes=10, in_channels=1, image_size=28, mean=(0.5,), std=(0.5,), width=32, hidden=128):
        super().__init__(mean, std)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(_flat_size(self.conv, in_channels, image_size), hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(hidden, num_classes)

    def body(self, x):
        return self.fc(self.conv(x))


class DeepCNN(Slimmable, Classifier):
    """`depth` conv layers with batch norm (default 6) in three stages, then global average pooling."""

    slim_widths = ("width",)

    def __init__(self, num_classes=10, in_channels=1, image_size=28, mean=(0.5,), std=(0.5,), width=32, depth=6):
        super().__init__(mean, std)
        if depth < 4:
            raise InvalidArgument(f"cnn-deep: depth must be >= 4 conv layers, got {depth}")
        layers: list[nn.Module] = []
        c_in = in_channels
        # Three stages of conv-BN-ReLU blocks, each ending in a 2x2 max-pool.
        counts = [depth // 3 + (1 if i < depth % 3 else 0) for i in range(3)]
        for stage, n in enumerate(counts):
            c_out = width * (2 ** stage)
            for _ in range(n):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
        self.conv = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c_in, num_classes)

    def body(self, x):
        return self.conv(x)


class MLP(Slimmable, Classifier):
    """Two hidden layers on flattened pixels."""

    slim_widths = ("hidden",)

    def __init__(self, num_classes=10, in_channels=1, image_size=28, mean=(0.5,), std=(0.5,), hidden=256):
        super().__init__(mean, std)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden // 2), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(hidden // 2, num_classes)

    def body(self, x):
        return self.net(x)


class ResNet18(Classifier):
    """torchvision's ResNet-18 adapted to small images: 3x3 stem, stride 1, no max-pool."""

    def __init__(self, num_classes=10, in_channels=3, image_size=32, mean=(0.5,), std=(0.5,)):
        super().__init__(mean, std)
        from torchvision.models import resnet18

        net = resnet18(weights=None, num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.classifier = net.fc
        net.fc = nn.Identity()
        self.net = net

    def body(self, x):
        return self.net(x)


BUILTIN_MODELS = {
    "cnn-small": SmallCNN,
    "cnn-deep": DeepCNN,
    "mlp": MLP,
    "resnet18": ResNet18,
}

REQUIRED_KWARGS = ("num_classes", "in_channels", "image_size", "mean", "std")


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture; unknown names list the known ones."""
    from dataselect.plugins import get_model_builder

    builder = get_model_builder(name)
    try:
        model = builder(**kwargs)
    except TypeError as exc:
        raise InvalidArgument(f"model {name!r}: bad arguments {sorted(kwargs)}: {exc}") from None
    check_protocol(name, model)
    return model


def check_protocol(name: str, model: nn.Module) -> None:
    if not callable(getattr(model, "features", None)) or not isinstance(getattr(model, "classifier", None), nn.Linear):
        raise InvalidArgument(
            f"model {name!r} does not follow the model protocol: it needs a features(x) method and a final nn.Linear named classifier"
        )


def list_models() -> list[str]:
    from dataselect.plugins import models

    return list(models())
