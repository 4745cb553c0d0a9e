"""The signals engine: every per-sample signal a strategy asks for, in as few passes as possible.

All signals are computed with the model in eval mode, so samples are
independent (batch norm uses running statistics) and batched gradients of a
summed loss are exact per-sample gradients.

Signals (names are part of the plugin interface, see `dataselect.names.SIGNALS`):
* `logits`, `probs`, `loss`, `features`: one forward pass under
  `torch.inference_mode()`.
* `grad_norm_last`: the per-sample gradient norm of the final linear layer
  `W h + b` under cross-entropy, in closed form from the same forward pass:
  ‖∇_W‖² + ‖∇_b‖² = ‖p − e_y‖² (‖h‖² + 1).
* `boundary_margin` (DynaMS): signed distance of `h` to the nearest decision
  boundary of the final layer, min_{c≠y} ((w_y − w_c)·h + b_y − b_c) / ‖w_y − w_c‖;
  `logit_margin`: z_y − max_{c≠y} z_c. Both from the same forward pass.
* `input_grad_norm`: ‖∂ℓ_i/∂x_i‖₂ over the [0, 1]-scaled input, from one
  backward pass of Σ ℓ_i (exact per sample in eval mode).
* `grad_norm_full`: ‖∇_θ ℓ_i‖₂ over all parameters: closed-form per-layer norms (Linear, Conv2d, BatchNorm2d) from one backward, else `torch.func`
  (`vmap(grad(functional_call))`), chunked so memory stays bounded.

Speed options (all off or neutral by default on the CPU, so results there are
unchanged unless asked for):
* `autocast_dtype`: the forward signals' model pass runs under
  `torch.autocast` (bf16/fp16); losses, probabilities and margins are still
  computed in float32 from the logits. Gradient signals always run in float32.
* `channels_last`: inputs go to the model in channels-last memory format (the
  model should be converted too, see `ScoringSession`).
* `input_size`: inputs are resized (area interpolation of the [0, 1] floats)
  to this (height, width) before the model sees them (cheap scoring on
  downscaled inputs, as Composer's selective backprop does).
* a compiled forward: `ScoringModel.compiled` (set by `ScoringSession` with
  `compile=True`) replaces the module's forward in the forward signals.
* on CUDA the pool is pinned and copied with `non_blocking=True`;
  `pick_micro_batch` sizes micro-batches from free device memory and
  `signal_bytes_per_sample` (the scoring session's `--micro-batch auto`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dataselect.errors import Cancelled, InvalidArgument
from dataselect.models import ScoringModel, to_unit_float
from dataselect.names import (FORWARD_SIGNALS, GRAD_SIGNALS, PER_SAMPLE_GRAD_SIGNALS, PRECISIONS, parse_bool,
                              parse_micro_batch)


#: Memory allowed for one chunk of per-sample parameter gradients.
PER_SAMPLE_GRAD_BYTES = 512 * 2**20

#: Micro-batch used when none is given, and by `micro_batch="auto"` off CUDA.
DEFAULT_MICRO_BATCH = 1024
#: Bounds for `micro_batch="auto"`, and the share of free device memory it plans to fill.
AUTO_MICRO_BATCH_MIN = 16
AUTO_MICRO_BATCH_MAX = 16384
AUTO_MEMORY_FRACTION = 0.5
#: Samples in the trial forward that measures activation memory.
TRIAL_SAMPLES = 8

_PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(spec: str, device: torch.device | str) -> torch.dtype | None:
    """'auto' | 'fp32' | 'bf16' | 'fp16' -> the autocast dtype for forward signals (None = float32).

    auto is bf16 on a CUDA device that supports it, else float32 (CPU, MPS,
    older GPUs). Explicit bf16/fp16 are honoured on the CPU too (CPU autocast).
    """
    spec = (spec or "auto").strip().lower()
    device = torch.device(device)
    if spec not in PRECISIONS:
        raise InvalidArgument(f"unknown precision {spec!r}; use one of: {', '.join(PRECISIONS)}")
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    dtype = _PRECISION_DTYPES[spec]
    if dtype is None:
        return None
    if not torch.amp.is_autocast_available(device.type):
        raise InvalidArgument(f"precision {spec} needs autocast, which torch does not offer on {device.type}; use fp32")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise InvalidArgument("precision bf16 asked for but this GPU does not support bfloat16; use fp16 or auto")
    return dtype


def resolve_channels_last(spec: str | bool | None, device: torch.device | str) -> bool:
    """'auto' | 'on' | 'off' (or a bool) -> whether to score in channels-last memory format.

    auto is on for CUDA and the CPU (on the development CPU it made the conv
    nets' forward 1.4-2x faster, see README) and off elsewhere (MPS).
    """
    if isinstance(spec, bool):
        return spec
    spec = "auto" if spec is None else str(spec).strip().lower()
    if spec == "auto":
        return torch.device(device).type in ("cuda", "cpu")
    value = parse_bool(spec)
    if value is not None:
        return value
    raise InvalidArgument(f"channels_last must be auto, on or off, got {spec!r}")


def free_device_memory(device: torch.device | str) -> int | None:
    """Free bytes on a CUDA device (`torch.cuda.mem_get_info`); None elsewhere (no budget to plan against)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def _autocast(device_type: str, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def prepare_inputs(x: torch.Tensor, *, channels_last: bool = False,
                   input_size: tuple[int, int] | None = None) -> torch.Tensor:
    """What the model sees: optionally resized (area interpolation in [0, 1] floats) and channels-last."""
    if input_size is not None and tuple(x.shape[-2:]) != tuple(input_size):
        x = F.interpolate(to_unit_float(x), size=tuple(input_size), mode="area")
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def as_scoring_model(model: nn.Module | ScoringModel) -> ScoringModel:
    """The engine works on a `ScoringModel`; a bare module is wrapped (keep the wrapper to keep what it learnt)."""
    return model if isinstance(model, ScoringModel) else ScoringModel(model)


def activation_bytes_per_sample(model: nn.Module | ScoringModel, x: torch.Tensor, *,
                                autocast_dtype: torch.dtype | None = None) -> int:
    """Bytes of module outputs one sample produces in a forward pass (a trial forward of `x`).

    Sums every module's distinct output tensor, so it bounds what a backward
    pass keeps alive and over-estimates what an inference pass needs at once.
    """
    seen: set[int] = set()
    kept: list[torch.Tensor] = []  # held until the end, so no freed storage is reused and mistaken for a seen one
    total = 0

    def hook(module, args, out):
        nonlocal total
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in seen:  # in-place layers (ReLU) return their input's storage
                    seen.add(ptr)
                    kept.append(t)
                    total += t.numel() * t.element_size()

    sm = as_scoring_model(model)
    measured = getattr(sm.module, "activation_bytes_per_sample", None)
    if isinstance(measured, int) and measured > 0:  # an exported program measured its own (hooks see no graph)
        return measured
    handles = [m.register_forward_hook(hook) for m in sm.module.modules() if not list(m.children())]
    try:
        with torch.inference_mode(), _autocast(x.device.type, autocast_dtype):
            sm.logits(x)
    finally:
        for h in handles:
            h.remove()
        kept.clear()
    return max(1, -(-total // max(1, x.shape[0])))


def pick_micro_batch(free_bytes: int, per_sample_bytes: int, *, fraction: float = AUTO_MEMORY_FRACTION,
                     low: int = AUTO_MICRO_BATCH_MIN, high: int = AUTO_MICRO_BATCH_MAX) -> int:
    """The micro-batch that fills `fraction` of `free_bytes` at `per_sample_bytes`, clamped to [low, high]."""
    fit = int(max(0, free_bytes) * fraction) // max(1, int(per_sample_bytes))
    return max(low, min(high, fit))


def signal_bytes_per_sample(model: nn.Module | ScoringModel, sample: torch.Tensor, wanted: Iterable[str], *,
                            autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
                            input_size: tuple[int, int] | None = None) -> int:
    """Device memory one sample needs while the wanted signals are computed (a trial forward of a few samples).

    The trial runs where the model lives. Gradient signals count activations
    twice (kept for the backward pass, plus their gradients) and run in float32.
    """
    wanted = frozenset(wanted)
    needs_grad = bool(wanted & (GRAD_SIGNALS | PER_SAMPLE_GRAD_SIGNALS))
    sm = as_scoring_model(model)
    dev = next(sm.module.parameters()).device
    x = prepare_inputs(sample[:TRIAL_SAMPLES].to(dev), channels_last=channels_last, input_size=input_size)
    was_training = sm.module.training
    sm.module.eval()
    try:
        per = activation_bytes_per_sample(sm, x, autocast_dtype=None if needs_grad else autocast_dtype)
    finally:
        sm.module.train(was_training)
    if needs_grad:
        per *= 2
    return per + x[:1].numel() * 4  # plus the float copy of the input


#: Forward signals that need the final linear layer (its input, or its weights).
LAST_LAYER_SIGNALS = frozenset({"features", "grad_norm_last", "boundary_margin"})


def _forward_block(sm: ScoringModel, x: torch.Tensor, y: torch.Tensor, wanted: frozenset[str], *,
                   autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    # Only the model runs under autocast; everything below works on float32 logits.
    last = wanted & LAST_LAYER_SIGNALS
    with _autocast(x.device.type, autocast_dtype):
        if last:
            h, z = sm.features_logits(x)
        else:
            h, z = None, sm.logits(x)
    if z.dim() != 2 or z.shape[0] != y.shape[0]:
        raise InvalidArgument(f"the model returned {list(z.shape)} for a batch of {y.shape[0]}; it must return "
                              "logits [N, num_classes]")
    out: dict[str, torch.Tensor] = {}
    zf = z.float()
    if "logits" in wanted:
        out["logits"] = zf
    if "features" in wanted:
        out["features"] = h.float()
    if wanted & {"loss"}:
        out["loss"] = F.cross_entropy(zf, y, reduction="none")
    if wanted & {"boundary_margin", "logit_margin"}:
        rows = torch.arange(y.numel(), device=y.device)
        # z_y - z_c = (w_y - w_c)·h + b_y - b_c, so the logits give every numerator.
        gap = zf[rows, y].unsqueeze(1) - zf
        if "logit_margin" in wanted:
            out["logit_margin"] = gap.index_put((rows, y), torch.tensor(float("inf"), device=zf.device)).min(1).values
        if "boundary_margin" in wanted:
            w = sm.final_linear().weight.float()
            dist = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist")  # [C, C], exact
            # Identical class weights have no boundary between them; skip that class.
            d = gap / dist[y].clamp_min(1e-12)
            d = torch.where(dist[y] > 0, d, torch.full_like(d, float("inf")))
            d[rows, y] = float("inf")
            out["boundary_margin"] = d.min(1).values
    if wanted & {"probs", "grad_norm_last"}:
        p = zf.softmax(dim=1)
        if "probs" in wanted:
            out["probs"] = p
        if "grad_norm_last" in wanted:
            err = p.clone()
            err[torch.arange(y.numel(), device=y.device), y] -= 1.0
            sq = err.pow(2).sum(1) * (h.float().pow(2).sum(1) + (1.0 if sm.final_linear().bias is not None else 0.0))
            out["grad_norm_last"] = sq.sqrt()
    return out


def _input_grad_block(sm: ScoringModel | nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    sm = as_scoring_model(sm)
    xf = sm.unit_inputs(x)
    if not xf.is_floating_point():
        raise InvalidArgument(f"input-gradient norms need floating-point inputs, and this model takes {xf.dtype}; "
                              "use a strategy without input gradients (e.g. high_loss)")
    with torch.enable_grad():
        xf = xf.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(sm.module(xf).float(), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, xf)
    return g.flatten(1).norm(dim=1)


def _layerwise_modules(model: nn.Module) -> list[nn.Module] | None:
    """The modules that own parameters, if every one of them is a layer whose per-sample
    gradient norm has a closed form (Linear on [N, D] inputs, Conv2d without groups, BatchNorm2d);
    None otherwise (the engine then uses torch.func)."""
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    for m in owners:
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                return None
        elif not isinstance(m, (nn.Linear, nn.BatchNorm2d)):
            return None
        if isinstance(m, nn.BatchNorm2d) and not m.affine:
            return None
    return owners


def _per_sample_grad_norm_layerwise(sm: ScoringModel | nn.Module, owners: list[nn.Module], x: torch.Tensor,
                                    y: torch.Tensor) -> torch.Tensor | None:
    """‖∇_θ ℓ_i‖ from one forward and one backward of Σ ℓ_i (exact per sample in eval mode).

    Each layer's per-sample gradient is a product of its input and its output gradient,
    so its squared norm needs neither vmap nor per-sample copies of the weights:
    Linear ‖δ_i a_iᵀ‖² = ‖δ_i‖² ‖a_i‖²; Conv2d ‖Σ_l δ_il u_ilᵀ‖² over output positions l,
    as Σ_{l,l'} (δ_il·δ_il')(u_il·u_il') ("ghost norm") or from the materialised
    gradient, whichever is smaller; BatchNorm2d (running statistics) Σ_l δ_il x̂_il.
    Returns None when a layer sees inputs it cannot handle (the caller falls back).
    """
    sm = as_scoring_model(sm)
    saved: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(module, inputs, output):
        saved[module] = (inputs[0].detach(), output)
        return output.clone()  # later in-place ops (ReLU(inplace=True)) must not touch `output`

    handles = [m.register_forward_hook(keep) for m in owners]
    try:
        with torch.enable_grad():
            xf = sm.unit_inputs(x).detach()
            z = sm.module(xf)
            loss = F.cross_entropy(z.float(), y, reduction="sum")
            if any(m not in saved for m in owners):
                return None  # a layer was skipped or called twice
            grads = torch.autograd.grad(loss, [saved[m][1] for m in owners], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    n = x.shape[0]
    sq = torch.zeros(n, device=x.device, dtype=torch.float32)
    for m, g in zip(owners, grads):
        a = saved[m][0].float()
        if g is None:
            continue
        g = g.float()
        if isinstance(m, nn.Linear):
            if a.dim() != 2:
                return None
            gn = g.pow(2).sum(1)
            if m.weight.requires_grad:
                sq += gn * a.pow(2).sum(1)
            if m.bias is not None and m.bias.requires_grad:
                sq += gn
        elif isinstance(m, nn.Conv2d):
            d = g.flatten(2)  # [N, C_out, L]
            if m.weight.requires_grad:
                u = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # [N, K, L]
                big = d.shape[1] * u.shape[1]
                ghost = d.shape[2] ** 2
                if ghost < big:
                    sq += (torch.bmm(d.transpose(1, 2), d) * torch.bmm(u.transpose(1, 2), u)).sum((1, 2))
                else:
                    sq += torch.bmm(d, u.transpose(1, 2)).pow(2).sum((1, 2))
            if m.bias is not None and m.bias.requires_grad:
                sq += d.sum(2).pow(2).sum(1)
        else:  # BatchNorm2d in eval mode: y = x̂ w + b with the running statistics
            xhat = (a - m.running_mean.view(1, -1, 1, 1)) / torch.sqrt(m.running_var.view(1, -1, 1, 1) + m.eps)
            if m.weight.requires_grad:
                sq += (g * xhat).sum((2, 3)).pow(2).sum(1)
            if m.bias.requires_grad:
                sq += g.sum((2, 3)).pow(2).sum(1)
    return sq.sqrt()


def _per_sample_grad_norm(sm: ScoringModel | nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    sm = as_scoring_model(sm)
    model = sm.module
    owners = _layerwise_modules(model)
    if owners is not None and not model.training:
        chunk = max(1, LAYERWISE_CHUNK)
        parts = []
        for i in range(0, x.shape[0], chunk):
            got = _per_sample_grad_norm_layerwise(sm, owners, x[i:i + chunk], y[i:i + chunk])
            if got is None:
                break
            parts.append(got)
        else:
            return torch.cat(parts) if parts else torch.empty(0)
    return _per_sample_grad_norm_vmap(sm, x, y)


#: Samples per forward/backward of the closed-form per-sample gradient norms (bounds the unfolded
#: conv inputs, ~150 MB for ResNet-18's first layers on 32x32 at 64 samples, and the ghost
#: norm's Gram matrices are [L, L] per sample and conv layer).
LAYERWISE_CHUNK = 64


def _per_sample_grad_norm_vmap(sm: ScoringModel | nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    sm = as_scoring_model(sm)
    model = sm.module
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    n_params = sum(p.numel() for p in params.values())
    xf = sm.unit_inputs(x)
    # Per sample: its parameter gradients plus the activations vmap keeps for the
    # backward pass and their gradients (measured by a one-sample trial forward).
    per_sample = 4 * n_params + 3 * activation_bytes_per_sample(sm, xf[:1])
    budget = PER_SAMPLE_GRAD_BYTES
    free = free_device_memory(x.device)
    if free is not None:
        budget = min(budget, int(free * AUTO_MEMORY_FRACTION))
    chunk = max(1, budget // per_sample)

    def loss_one(p, b, xi, yi):
        z = functional_call(model, (p, b), (xi.unsqueeze(0),))
        return F.cross_entropy(z.float(), yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, None, 0, 0))
    norms = []
    with torch.enable_grad():
        for i in range(0, xf.shape[0], chunk):
            g = per_sample(params, buffers, xf[i:i + chunk], y[i:i + chunk])
            sq = sum(t.flatten(1).float().pow(2).sum(1) for t in g.values())
            norms.append(sq.sqrt())
    return torch.cat(norms)


def compute_signals(
    model: nn.Module | ScoringModel,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    wanted: Iterable[str],
    *,
    device: torch.device | str = "cpu",
    micro_batch: int = DEFAULT_MICRO_BATCH,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    input_size: tuple[int, int] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Compute the wanted signals for a pool, in micro-batches; results are on the CPU.

    `model` is any module returning logits, or a `ScoringModel` (keep one per
    model: it remembers the final linear layer it found). The speed options
    (`autocast_dtype`, `channels_last`, `input_size`) are described in the
    module docstring. `cancelled` is asked
    before every micro-batch; when it returns True the work stops with `Cancelled`
    (a caller whose deadline passed must not keep the device busy).
    """
    wanted = frozenset(wanted)
    unknown = wanted - FORWARD_SIGNALS - GRAD_SIGNALS - PER_SAMPLE_GRAD_SIGNALS
    if unknown:
        raise InvalidArgument(f"unknown signals {sorted(unknown)}")
    if not wanted:
        return {}
    if micro_batch < 1:
        raise InvalidArgument(f"micro_batch must be >= 1, got {micro_batch}")
    device = torch.device(device)
    sm = as_scoring_model(model)
    model = sm.module
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in wanted}
    non_blocking = device.type == "cuda"
    if non_blocking:
        # Page-locked host memory lets the copies below run asynchronously.
        if inputs.device.type == "cpu" and not inputs.is_pinned():
            inputs = inputs.pin_memory()
        if labels.device.type == "cpu" and not labels.is_pinned():
            labels = labels.pin_memory()
    try:
        for start in range(0, inputs.shape[0], micro_batch):
            if cancelled is not None and cancelled():
                raise Cancelled(f"scoring stopped after {start} of {inputs.shape[0]} samples: the caller cancelled "
                                "or its deadline passed")
            x = inputs[start:start + micro_batch].to(device, non_blocking=non_blocking)
            y = labels[start:start + micro_batch].to(device, non_blocking=non_blocking).long()
            x = prepare_inputs(x, channels_last=channels_last, input_size=input_size)
            if wanted & FORWARD_SIGNALS:
                with torch.inference_mode():
                    for k, v in _forward_block(sm, x, y, wanted & FORWARD_SIGNALS,
                                               autocast_dtype=autocast_dtype).items():
                        parts[k].append(v.cpu())
            if "input_grad_norm" in wanted:
                parts["input_grad_norm"].append(_input_grad_block(sm, x, y).detach().cpu())
            if "grad_norm_full" in wanted:
                parts["grad_norm_full"].append(_per_sample_grad_norm(sm, x, y).detach().cpu())
    finally:
        model.train(was_training)
    return {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}


def synchronize(device: torch.device | str) -> None:
    """Wait for queued device work so that timings are honest."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


def resolve_device(spec: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> a usable torch.device, or a clear error."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise InvalidArgument(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgument(f"device {spec!r} asked for but CUDA is not available here; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgument(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise InvalidArgument("device 'mps' asked for but MPS is not available here; use --device cpu or auto")
    elif dev.type != "cpu":
        raise InvalidArgument(f"unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev


__all__ = ["compute_signals", "synchronize", "resolve_device", "resolve_precision", "resolve_channels_last",
           "parse_micro_batch", "signal_bytes_per_sample", "free_device_memory", "pick_micro_batch", "prepare_inputs"]
