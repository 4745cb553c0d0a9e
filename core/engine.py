"""The signals engine: every per-sample signal a strategy asks for, in as few passes as possible.

All signals are computed with the model in eval mode, so samples are
independent (batch norm uses running statistics) and batched gradients of a
summed loss are exact per-sample gradients.

Signals (names are part of the plugin interface, see `plugins.base.SIGNALS`):
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
* `grad_norm_full`: ‖∇_θ ℓ_i‖₂ over all parameters, with `torch.func`
  (`vmap(grad(functional_call))`), chunked so memory stays bounded.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dataselect.errors import InvalidArgument
from dataselect.models import to_unit_float

FORWARD_SIGNALS = frozenset({"logits", "probs", "loss", "features", "grad_norm_last", "boundary_margin", "logit_margin"})
GRAD_SIGNALS = frozenset({"input_grad_norm"})
PER_SAMPLE_GRAD_SIGNALS = frozenset({"grad_norm_full"})

#: Memory allowed for one chunk of per-sample parameter gradients.
PER_SAMPLE_GRAD_BYTES = 512 * 2**20


def _forward_block(model: nn.Module, x: torch.Tensor, y: torch.Tensor, wanted: frozenset[str]) -> dict[str, torch.Tensor]:
    h = model.features(x)
    z = model.classifier(h)
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
            w = model.classifier.weight.float()
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
            sq = err.pow(2).sum(1) * (h.float().pow(2).sum(1) + (1.0 if model.classifier.bias is not None else 0.0))
            out["grad_norm_last"] = sq.sqrt()
    return out


def _input_grad_block(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        xf = to_unit_float(x).detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(xf).float(), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, xf)
    return g.flatten(1).norm(dim=1)


def _per_sample_grad_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    n_params = sum(p.numel() for p in params.values())
    chunk = max(1, PER_SAMPLE_GRAD_BYTES // max(1, 4 * n_params))

    def loss_one(p, b, xi, yi):
        z = functional_call(model, (p, b), (xi.unsqueeze(0),))
        return F.cross_entropy(z.float(), yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, None, 0, 0))
    xf = to_unit_float(x)
    norms = []
    with torch.enable_grad():
        for i in range(0, xf.shape[0], chunk):
            g = per_sample(params, buffers, xf[i:i + chunk], y[i:i + chunk])
            sq = sum(t.flatten(1).float().pow(2).sum(1) for t in g.values())
            norms.append(sq.sqrt())
    return torch.cat(norms)


def compute_signals(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    wanted: Iterable[str],
    *,
    device: torch.device | str = "cpu",
    micro_batch: int = 1024,
) -> dict[str, torch.Tensor]:
    """Compute the wanted signals for a pool, in micro-batches; results are on the CPU."""
    wanted = frozenset(wanted)
    unknown = wanted - FORWARD_SIGNALS - GRAD_SIGNALS - PER_SAMPLE_GRAD_SIGNALS
    if unknown:
        raise InvalidArgument(f"unknown signals {sorted(unknown)}")
    if not wanted:
        return {}
    if micro_batch < 1:
        raise InvalidArgument(f"micro_batch must be >= 1, got {micro_batch}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in wanted}
    non_blocking = device.type == "cuda"
    try:
        for start in range(0, inputs.shape[0], micro_batch):
            x = inputs[start:start + micro_batch].to(device, non_blocking=non_blocking)
            y = labels[start:start + micro_batch].to(device, non_blocking=non_blocking).long()
            if wanted & FORWARD_SIGNALS:
                with torch.inference_mode():
                    for k, v in _forward_block(model, x, y, wanted & FORWARD_SIGNALS).items():
                        parts[k].append(v.cpu())
            if "input_grad_norm" in wanted:
                parts["input_grad_norm"].append(_input_grad_block(model, x, y).detach().cpu())
            if "grad_norm_full" in wanted:
                parts["grad_norm_full"].append(_per_sample_grad_norm(model, x, y).detach().cpu())
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


def isfinite_inputs(x: torch.Tensor) -> bool:
    return not x.is_floating_point() or bool(torch.isfinite(x).all())


__all__ = ["compute_signals", "synchronize", "resolve_device"]
