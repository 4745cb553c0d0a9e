"""Checkpoints: a dict of data, never code.

Layout (loadable with `torch.load(..., weights_only=True)`):
    {"format": "dataselect.checkpoint/1", "model": registry name,
     "kwargs": builder kwargs, "state_dict": ..., "version": int, "step": int,
     optional "optimizer" (optimiser state) and "config" (plain dict)}
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dataselect.errors import InvalidArgument
from dataselect.models import build_model

FORMAT = "dataselect.checkpoint/1"
#: Dtypes floating weights may travel in when pushed to a scorer (`--checkpoint-dtype`).
CHECKPOINT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_checkpoint(model_name: str, kwargs: dict, model: nn.Module, *, version: int = 0, step: int = 0,
                    optimizer: torch.optim.Optimizer | None = None, config: dict | None = None) -> dict[str, Any]:
    ckpt: dict[str, Any] = {
        "format": FORMAT,
        "model": model_name,
        "kwargs": dict(kwargs),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "version": int(version),
        "step": int(step),
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if config is not None:
        ckpt["config"] = config
    return ckpt


def to_bytes(ckpt: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def from_bytes(data: bytes) -> Any:
    """Load checkpoint bytes with weights_only=True; anything unsafe or broken is an InvalidArgument."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArgument(f"checkpoint refused: it is not plain data loadable with weights_only=True ({first})") from None
    except Exception as exc:
        raise InvalidArgument(f"checkpoint could not be read (truncated or not a torch.save file): {type(exc).__name__}: {exc}") from None


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def load_checkpoint(path_or_bytes: str | Path | bytes) -> dict[str, Any]:
    """Read a checkpoint file (or bytes) and check its layout."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        ckpt = from_bytes(bytes(path_or_bytes))
    else:
        path = Path(path_or_bytes)
        if not path.is_file():
            raise InvalidArgument(f"checkpoint {path} does not exist")
        ckpt = from_bytes(path.read_bytes())
    return validate(ckpt)


def validate(ckpt: Any) -> dict[str, Any]:
    if not isinstance(ckpt, dict):
        raise InvalidArgument(f"checkpoint must be a dict with model, kwargs and state_dict; got {type(ckpt).__name__}")
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InvalidArgument("checkpoint has no 'state_dict' mapping names to tensors")
    return ckpt


def load_state(model: nn.Module, state: dict[str, torch.Tensor], *, model_name: str = "model") -> None:
    """Load a state dict strictly; a mismatch says which keys and shapes differ."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}")
        raise InvalidArgument(f"checkpoint does not fit {model_name}: {'; '.join(parts)}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InvalidArgument(f"checkpoint for {model_name} holds NaN or Inf in {bad[:5]}; "
                              "push weights from before training diverged")
    model.load_state_dict(state, strict=True)


def build_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Build the checkpoint's architecture and load its weights."""
    ckpt = validate(ckpt)
    name = ckpt.get("model")
    if not isinstance(name, str):
        raise InvalidArgument("checkpoint does not name its model architecture ('model' key)")
    model = build_model(name, **dict(ckpt.get("kwargs") or {}))
    load_state(model, ckpt["state_dict"], model_name=name)
    return model
