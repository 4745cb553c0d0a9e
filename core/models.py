"""Models: any `nn.Module` that maps a batch to logits, the registry, and the fast-path protocol.

What the signals engine needs is only `model(x) -> logits [N, num_classes]`
(`ScoringModel` wraps any module). Last-layer signals (penultimate features,
the closed-form last-layer gradient norm, decision-boundary margins) also
need the final `nn.Linear`: `ScoringModel` finds it (or is told its name) and
takes its input with a forward hook.

The registry's built-in models follow a protocol that makes this a fast
path and keeps preprocessing in one place:
* `model(x)` takes images as stored — uint8 `[N, C, H, W]` (scaled to [0, 1]
  inside) or float in [0, 1] — and normalises them by the dataset's mean/std
  itself, so the trainer and the scoring server can never disagree about it;
* `model.features(x)` returns the penultimate features `h` `[N, D]`;
* `model.classifier` is the final `nn.Linear`, so `model(x) == classifier(features(x))`;
* optional: the builder's `slim_kwargs(kwargs, ratio)` returns the kwargs of a
  narrower twin whose every tensor is a leading slice of the full model's
  (the parameter-sharing proxy, `dataselect.proxy`; mixin `Slimmable`).

Architectures are registered through the `register_models` hook (the
built-ins in `dataselect.plugins.builtin_models`); `build_model(name, **kw)`
is the one factory. A builder that takes fewer arguments than the trainer
knows (e.g. `torchvision.models.resnet18`, which takes `num_classes` only)
gets only the ones it accepts, and when it does not take `mean`/`std` its
model is wrapped in `Normalized`, so it too receives normalised float images.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dataselect import registry
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


class Normalized(nn.Module):
    """A model that does not normalise its inputs itself, behind `Normalize`: takes uint8 or [0, 1] images."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def accepted_kwargs(builder: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` less the data set's standard arguments (`REQUIRED_KWARGS`) that `builder` does not take.

    Other arguments always reach the builder, so a misspelt one fails loudly.
    """
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return dict(kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params or k not in REQUIRED_KWARGS}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture; unknown names list the known ones.

    The builder gets the arguments it accepts. When the trainer passes the
    data set's `mean`/`std` and the builder takes neither, the model is wrapped
    in `Normalized` so that it sees normalised float images like the
    protocol models do.
    """
    builder = registry.get_model_builder(name)
    given = accepted_kwargs(builder, kwargs)
    while True:
        try:
            model = builder(**given)
            break
        except TypeError as exc:
            # Builders with **kwargs (torchvision's) say only when called which standard argument they lack.
            unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
            if unknown is None or unknown.group(1) not in REQUIRED_KWARGS or unknown.group(1) not in given:
                raise InvalidArgument(f"model {name!r}: bad arguments {sorted(given)}: {exc}") from None
            given.pop(unknown.group(1))
    if not isinstance(model, nn.Module):
        raise InvalidArgument(f"model {name!r}: the builder returned {type(model).__name__}, not an nn.Module")
    if "mean" in kwargs and "std" in kwargs and "mean" not in given and "std" not in given:
        model = Normalized(model, kwargs["mean"], kwargs["std"])
    # What a scoring server needs to build the same model (dataselect.Session sends it).
    model.dataselect_model = (name, dict(kwargs))
    return model


def follows_protocol(model: nn.Module) -> bool:
    """True for models with `features(x)` and a final `nn.Linear` named `classifier` (the fast path)."""
    return callable(getattr(model, "features", None)) and isinstance(getattr(model, "classifier", None), nn.Linear)


class ScoringModel:
    """A model as the signals engine runs it: logits, and (features, logits) at the final linear layer.

    Any `nn.Module` mapping a batch to logits `[N, C]` works for loss,
    probability, margin, input-gradient and full-gradient signals. Last-layer
    signals need the final `nn.Linear` whose output *is* the model's output:
    for protocol models it is `classifier` and the features come from
    `features(x)` (checked once by a trial forward: a module with those names
    whose output is not `classifier(features(x))`, such as torchvision's
    DenseNet, takes the general path); otherwise it is the layer named
    `last_layer` (a name from `module.named_modules()`, e.g. "fc"), or found by
    a trial forward (the last `nn.Linear` whose output equals the model's), and
    its input is taken with a forward hook. A model with no such layer still
    serves every other signal; asking it for a last-layer signal is an
    `InvalidArgument` naming `last_layer`.
    """

    def __init__(self, module: nn.Module, *, last_layer: str | None = None):
        self.module = module
        #: An exported program (`dataselect.exported.ExportedModel`) knows its final layer and features itself.
        self.exported = callable(getattr(module, "features_logits", None)) and hasattr(module, "final_layer")
        if self.exported:
            last_layer = None
        self.last_layer = last_layer
        #: Registry models (and wrapped ones) are known to take uint8 or [0, 1] float images.
        self.takes_images = isinstance(module, (Classifier, Normalized))
        candidate = last_layer is None and follows_protocol(module)
        #: True: features(x) + classifier (confirmed for dataselect's own models, else by the first trial forward).
        self.protocol = candidate and isinstance(module, Classifier)
        self._unchecked_protocol = candidate and not self.protocol
        self._linear: nn.Linear | None = module.classifier if self.protocol else None
        self._linear_name: str | None = "classifier" if self.protocol else None
        if self.exported:
            self._linear, self._linear_name = module.final_layer, module.last_layer
        if last_layer is not None:
            named = dict(module.named_modules()).get(last_layer)
            if not isinstance(named, nn.Linear):
                linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
                what = "no module" if named is None else f"a {type(named).__name__}, not an nn.Linear"
                raise InvalidArgument(f"last_layer={last_layer!r}: the model has {what} of that name; its nn.Linear "
                                      f"layers are: {', '.join(linears) or 'none'}")
        #: A compiled replacement for `module.features` (protocol models) or `module` (others), or None.
        self.compiled: Callable | None = None

    # -- what the engine calls ----------------------------------------------------------
    def unit_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs as the model takes them for gradients: image models take uint8 images as [0, 1]
        floats; other models get their inputs as given."""
        if self.takes_images or self.protocol:
            return to_unit_float(x)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            return self.module.classifier(self.compiled(x)) if self.protocol else self.compiled(x)
        return self.module(x)

    def features_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features `[N, D]` (the final linear layer's input) and logits."""
        if self.exported:
            return self.module.features_logits(x)
        if self._unchecked_protocol:
            self._check_protocol(x)
        if self.protocol:
            h = (self.compiled or self.module.features)(x)
            return h, self.module.classifier(h)
        layer = self.final_linear(x)
        seen: list[torch.Tensor] = []
        handle = layer.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
        try:
            z = self.module(x)
        finally:
            handle.remove()
        if len(seen) != 1 or seen[0].dim() != 2:
            raise InvalidArgument(f"last-layer signals need the final nn.Linear {self._linear_name!r} to be called once "
                                  f"per forward on [N, D] features; it was called {len(seen)} time(s)"
                                  + (f" on {list(seen[0].shape)}" if seen else "")
                                  + "; name the right layer with last_layer=, or use a strategy without last-layer signals")
        return seen[0], z

    def _check_protocol(self, x: torch.Tensor) -> None:
        """A module with `features` and `classifier` is on the fast path only if its output is classifier(features(x))."""
        self._unchecked_protocol = False
        m = self.module
        was_training = m.training
        m.eval()
        try:
            with torch.inference_mode():
                z = m(x[:2])
                same = z.shape == (min(2, x.shape[0]), m.classifier.out_features) and torch.allclose(
                    m.classifier(m.features(x[:2])), z)
        finally:
            m.train(was_training)
        if same:
            self.protocol, self._linear, self._linear_name = True, m.classifier, "classifier"

    def final_linear(self, example: torch.Tensor | None = None) -> nn.Linear:
        """The final `nn.Linear` (found with a trial forward of `example` the first time)."""
        if self._unchecked_protocol and example is not None:
            self._check_protocol(example)
        if self._linear is None:
            if example is None:
                raise InvalidArgument("the final linear layer is not known yet: score a pool first")
            self._linear, self._linear_name = self._find_final_linear(example)
        return self._linear

    @property
    def final_linear_name(self) -> str | None:
        return self._linear_name

    def _find_final_linear(self, x: torch.Tensor) -> tuple[nn.Linear, str]:
        named = [(n, m) for n, m in self.module.named_modules() if isinstance(m, nn.Linear)]
        if self.last_layer is not None:
            named = [(n, m) for n, m in named if n == self.last_layer]
        outputs: dict[str, torch.Tensor] = {}
        handles = [m.register_forward_hook(lambda _m, _a, out, n=n: outputs.__setitem__(n, out)) for n, m in named]
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.inference_mode():
                z = self.module(x[:2])
        finally:
            self.module.train(was_training)
            for h in handles:
                h.remove()
        for name, layer in reversed(named):
            out = outputs.get(name)
            if out is not None and out.shape == z.shape and torch.equal(out, z):
                return layer, name
        if self.last_layer is not None:
            raise InvalidArgument(f"last_layer={self.last_layer!r}: its output is not the model's output (something "
                                  "runs after it); last-layer signals need the nn.Linear that produces the logits")
        raise InvalidArgument(
            f"last-layer signals need the model's final nn.Linear, and no nn.Linear of {type(self.module).__name__} "
            f"produces its output (layers: {', '.join(n for n, _ in named) or 'none'}); name it with last_layer=, "
            "or use a strategy whose signals need no last layer (e.g. high_loss, or high_gradient scope=full)")


def list_models() -> list[str]:
    return list(registry.models())


def input_dtype(scoring: "ScoringModel") -> torch.dtype:
    """The dtype a trial input for this model has: uint8 images for registered image models, the exported
    program's own input dtype, float32 otherwise."""
    if scoring.exported:
        return scoring.module.input_dtype
    return torch.uint8 if scoring.takes_images else torch.float32
