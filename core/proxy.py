"""The parameter-sharing proxy (PSP) of DynaMS: a narrower sub-network of the learner.

A model whose builder offers `slim_kwargs(kwargs, ratio)` has a *slim* twin:
the same architecture built with `ratio` of the channels (units) in every
hidden layer. Every parameter and buffer of the slim model is the **leading
slice** of the full model's tensor along each dimension (conv out/in
channels, batch-norm channels, linear out/in features; the classifier keeps
every output), so the slim network is exactly the sub-network of the full
one that uses the first `ratio` of each layer's channels. It owns no weights:

* the trainer computes its logits with `proxy_logits(full, slim, x)`, a
  `torch.func.functional_call` on views of the full model's parameters, and
  adds `weight · CE(proxy logits)` to the loss, so the proxy is trained
  jointly and its gradients land in the shared (leading-slice) entries;
* the scoring session copies the leading slices in after each checkpoint
  (`copy_shared`) and computes the strategy's signals with the slim model, at
  a fraction of the full model's cost (`flops_ratio`).

Batch norm is the one thing that cannot be shared: the slim network's
channels see fewer inputs, so their statistics differ from the full model's.
The slim model's running statistics are therefore re-estimated by the scoring
session from the head of each pool it scores (`calibrate_batchnorm`, one
train-mode forward of up to `CALIBRATION_SAMPLES` samples, once per
checkpoint version), as slimmable networks do after training.

The agreement between proxy and full model is reported as the Spearman rank
correlation of their signals (`rank_correlation`) on a bounded head of each
pool.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dataselect import registry
from dataselect.errors import InvalidArgument
from dataselect.models import build_model
from dataselect.names import SLIM_PROXY

#: Pool samples used to re-estimate the slim model's batch-norm statistics.
CALIBRATION_SAMPLES = 256


def _builder(model_name: str):
    return registry.get_model_builder(model_name)


def supports_proxy(model_name: str) -> bool:
    """True when the registered model's builder offers `slim_kwargs`."""
    return callable(getattr(_builder(model_name), "slim_kwargs", None))


def proxy_models() -> list[str]:
    """Registered models that have a parameter-sharing sub-network."""
    return [name for name, reg in registry.models().items() if callable(getattr(reg.obj, "slim_kwargs", None))]


def check_ratio(ratio: float, who: str = "proxy") -> float:
    ratio = float(ratio)
    if not 0.0 < ratio <= 1.0:
        raise InvalidArgument(f"{who}: width_ratio must be in (0, 1], got {ratio}")
    return ratio


def build_proxy(model_name: str, kwargs: dict[str, Any], ratio: float, *, full: nn.Module | None = None,
                who: str = "the parameter-sharing proxy") -> nn.Module:
    """The slim twin of `model_name(**kwargs)` with `ratio` of its channels, checked against `full`.

    Raises InvalidArgument naming the models that have one when this model does not.
    """
    ratio = check_ratio(ratio, who)
    slim_kwargs = getattr(_builder(model_name), "slim_kwargs", None)
    if not callable(slim_kwargs):
        raise InvalidArgument(
            f"{who} needs a model with a parameter-sharing sub-network, and model {model_name!r} has none "
            f"(its builder defines no slim_kwargs); use one of: {', '.join(proxy_models()) or 'none registered'}, "
            "or proxy=none")
    slim = build_model(model_name, **slim_kwargs(dict(kwargs), ratio))
    if full is None:
        full = build_model(model_name, **kwargs)
    check_leading_slices(full, slim, model_name)
    return slim


def check_leading_slices(full: nn.Module, slim: nn.Module, model_name: str = "model") -> None:
    """Every slim tensor must be a leading slice of the full tensor of the same name; the classifier keeps its outputs."""
    full_state, slim_state = full.state_dict(), slim.state_dict()
    if set(full_state) != set(slim_state):
        diff = sorted(set(full_state) ^ set(slim_state))
        raise InvalidArgument(f"model {model_name!r}: slim_kwargs builds a different architecture "
                              f"(tensors {diff[:5]} are not in both); it may only narrow the layers")
    for key, t in slim_state.items():
        f = full_state[key]
        if t.dim() != f.dim() or any(s > g for s, g in zip(t.shape, f.shape)):
            raise InvalidArgument(f"model {model_name!r}: slim tensor {key} {list(t.shape)} is not a leading slice "
                                  f"of the full model's {list(f.shape)}")
    if slim.classifier.out_features != full.classifier.out_features:
        raise InvalidArgument(f"model {model_name!r}: the slim classifier must keep all "
                              f"{full.classifier.out_features} outputs")


def _leading(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t if t.dim() == 0 else t[tuple(slice(0, s) for s in shape)]


def shared_slices(full: Mapping[str, torch.Tensor], slim: nn.Module, *, buffers: bool = True) -> dict[str, torch.Tensor]:
    """The leading slices of `full` (a state dict or named parameters) shaped like `slim`'s tensors.

    Views, not copies: gradients through them reach the full tensors.
    """
    targets = dict(slim.named_parameters())
    if buffers:
        targets.update(dict(slim.named_buffers()))
    return {name: _leading(full[name], t.shape) for name, t in targets.items() if name in full}


@torch.no_grad()
def copy_shared(full: nn.Module, slim: nn.Module) -> None:
    """Make `slim` the sub-network of `full`: copy the leading slices of every parameter and buffer."""
    src = dict(full.named_parameters())
    src.update(dict(full.named_buffers()))
    for name, t in list(slim.named_parameters()) + list(slim.named_buffers()):
        t.copy_(_leading(src[name], t.shape))


def proxy_logits(full: nn.Module, slim: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The slim sub-network's logits computed with (views of) `full`'s parameters, differentiably.

    The slim module's own buffers (batch-norm statistics) are used and updated
    as usual; its own parameters are not used.
    """
    params = shared_slices(dict(full.named_parameters()), slim, buffers=False)
    return torch.func.functional_call(slim, params, (x,))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Re-estimate every batch-norm layer's running statistics from the batch `x` (one train-mode forward)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or x.shape[0] == 0:
        return
    momenta = [m.momentum for m in bns]
    was_training = model.training
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly its statistics
        model.train()
        model(x)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(was_training)


def forward_flops(model: nn.Module, sample: torch.Tensor) -> int:
    """Floating-point operations of one forward pass on `sample` (torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(sample)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n, ties sharing the mean of their positions."""
    x = x.double().flatten()
    n = x.numel()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(1, n + 1, dtype=torch.float64)
    uniq, inverse = torch.unique(x, return_inverse=True)
    if uniq.numel() < n:  # average the ranks within each group of ties
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
        counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones(n, dtype=torch.float64))
        ranks = (sums / counts)[inverse]
    return ranks


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rank correlation of two equally long vectors (ties get average ranks).

    None when it is undefined: fewer than two values, or one vector constant.
    """
    a, b = a.detach().cpu().flatten(), b.detach().cpu().flatten()
    if a.numel() != b.numel():
        raise InvalidArgument(f"rank_correlation: {a.numel()} and {b.numel()} values differ in number")
    if a.numel() < 2:
        return None
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    if denom == 0.0:
        return None
    return float((ra * rb).sum()) / denom


class SessionProxy:
    """The scoring session's side of the proxy: a slim model kept equal to the sub-network of the full one.

    `sync` copies the shared weights in once per checkpoint version;
    `calibrating` re-estimates batch-norm statistics from the head of a pool
    (models without batch norm skip it); `agreement` collects the full model's
    and the proxy's signals on the first `agreement_sample` samples of a pool.
    """

    def __init__(self, model_name: str, kwargs: dict[str, Any], ratio: float, full: nn.Module,
                 device: torch.device, *, loss_weight: float, agreement_sample: int, input_shape: tuple,
                 who: str = "the parameter-sharing proxy"):
        self.ratio = check_ratio(ratio, who)
        self.loss_weight = float(loss_weight)
        self.agreement_sample = max(0, int(agreement_sample))
        self.model = build_proxy(model_name, kwargs, self.ratio, full=full, who=who).to(device).eval()
        self.device = device
        self.version: int | None = None
        self.calibrated_version: int | None = None
        self.needs_calibration = has_batchnorm(self.model)
        self.flops_ratio: float | None = None
        if input_shape is not None and None not in input_shape:
            sample = torch.zeros((1, *input_shape), dtype=torch.uint8, device=device)
            full_flops = forward_flops(full, sample)
            if full_flops:
                self.flops_ratio = forward_flops(self.model, sample) / full_flops

    def sync(self, full: nn.Module, version: int | None) -> None:
        """Copy the full model's leading slices in, unless this version is already in."""
        if version is not None and version == self.version:
            return
        copy_shared(full, self.model)
        self.model.eval()
        self.version = version

    def calibrating(self, chunks: Iterable[Any],
                    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[Any]:
        """Pass the chunks through; before the first leaves, re-estimate batch-norm statistics from the pool's head.

        Chunks are held back only until `CALIBRATION_SAMPLES` samples have arrived,
        so the statistics do not depend on how the pool was split. `prepare` turns
        inputs into what the model sees when scoring (resizing, memory format).
        """
        if not self.needs_calibration or self.calibrated_version == self.version:
            yield from chunks
            return
        held, have = [], 0
        it = iter(chunks)
        for chunk in it:
            held.append(chunk)
            have += int(chunk.ids.numel())
            if have >= CALIBRATION_SAMPLES:
                break
        head = [c.inputs for c in held if c.inputs is not None]
        if head:
            x = torch.cat(head)[:CALIBRATION_SAMPLES].to(self.device)
            if x.is_floating_point() and x.dtype != torch.float32:
                x = x.float()
            calibrate_batchnorm(self.model, x if prepare is None else prepare(x))
            self.calibrated_version = self.version
        yield from held
        yield from it

    def agreement(self, full_signals: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]) -> "Agreement":
        """A tracker for one Select: `full_signals(inputs, labels)` computes the full model's signals."""
        return Agreement(self, full_signals)


class Agreement:
    """The proxy's agreement with the full model over the first `agreement_sample` samples of one pool."""

    def __init__(self, proxy: SessionProxy, full_signals: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]):
        self.proxy = proxy
        self.full_signals = full_signals
        self.left = proxy.agreement_sample
        self.full: dict[str, list[torch.Tensor]] = {}
        self.mine: dict[str, list[torch.Tensor]] = {}
        self.seconds = 0.0

    def observe(self, inputs: torch.Tensor | None, labels: torch.Tensor, proxy_signals: dict[str, torch.Tensor]) -> None:
        """Score the head of this chunk with the full model too, while the sample is not complete."""
        if self.left <= 0 or inputs is None or labels.numel() == 0:
            return
        take = min(self.left, int(labels.numel()))
        t0 = time.perf_counter()
        full = self.full_signals(inputs[:take], labels[:take])
        self.seconds += time.perf_counter() - t0
        for name, value in full.items():
            self.full.setdefault(name, []).append(value)
            self.mine.setdefault(name, []).append(proxy_signals[name][:take])
        self.left -= take

    def result(self) -> dict[str, Any]:
        """Width, cost ratio and agreement: the Spearman rank correlation of each per-sample signal, proxy vs full."""
        out: dict[str, Any] = {"proxy_width_ratio": self.proxy.ratio}
        if self.proxy.flops_ratio is not None:
            out["proxy_flops_ratio"] = round(self.proxy.flops_ratio, 4)
        names = sorted(k for k, v in self.full.items() if v[0].dim() == 1)
        for name in names:
            rho = rank_correlation(torch.cat(self.mine[name]), torch.cat(self.full[name]))
            if rho is not None:
                out["proxy_rank_correlation" if len(names) == 1 else f"proxy_rank_correlation_{name}"] = rho
        if names:
            out["proxy_agreement_samples"] = int(sum(t.numel() for t in self.full[names[0]]))
            out["proxy_agreement_seconds"] = self.seconds
        return out


def slim_proxy_loss(module: nn.Module, *, model_name: str | None, model_kwargs: dict[str, Any] | None,
                    params: Mapping[str, Any], device: torch.device) -> Callable[..., torch.Tensor]:
    """The auxiliary loss `slim_proxy`: per-sample cross-entropy of the slim sub-network's logits
    (`params["width_ratio"]` of the channels), so the trainer trains it jointly with the model."""
    if model_name is None:
        raise InvalidArgument(f"auxiliary loss {SLIM_PROXY!r} (a parameter-sharing proxy) needs a registered model "
                              "(build it with dataselect.models.build_model)")
    slim = build_proxy(model_name, model_kwargs or {}, params.get("width_ratio", 0.0), full=module,
                       who="the parameter-sharing proxy").to(device).train()

    def term(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(proxy_logits(model, slim, inputs).float(), targets, reduction="none")

    term.module = slim
    return term
