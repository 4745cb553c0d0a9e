"""Checkpoints: a dict of data, never code.

Layout (loadable with `torch.load(..., weights_only=True)`):
    {"format": "dataselect.checkpoint/1", "model": registry name,
     "kwargs": builder kwargs, "state_dict": ..., "version": int, "step": int,
     optional "optimizer" (optimiser state) and "config" (plain dict)}
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dataselect.errors import InvalidArgument, first_line
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


#: Dtypes a checkpoint's tensors may have (no complex, quantized or other exotic kinds).
TENSOR_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
                           torch.int16, torch.int32, torch.int64, torch.bool})
#: Entries a checkpoint archive may hold (torch.save writes a handful plus one per storage).
MAX_ARCHIVE_ENTRIES = 100_000


def stored_zip(data: bytes, what: str, fix: str, max_entries: int) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """Open a zip archive whose entries must all be stored, before anything is decompressed or allocated.

    A crafted archive of compressed entries (a few MB that inflate to GiBs), of
    encrypted ones, or of entries that overlap and so count the same bytes many
    times is refused, so the bytes unpacked are bounded by the bytes received.
    Errors name `what` and end with `fix`.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except Exception as exc:  # BadZipFile, but also ValueError, OSError, EOFError... on crafted headers
        raise InvalidArgument(f"{what} could not be read as a zip archive (truncated or damaged: "
                              f"{first_line(exc, 200)}); {fix}") from None
    if len(infos) > max_entries:
        raise InvalidArgument(f"{what} refused: its archive holds {len(infos)} entries (at most {max_entries})")
    total = 0
    for e in infos:
        if e.compress_type != zipfile.ZIP_STORED or e.file_size != e.compress_size:
            raise InvalidArgument(f"{what} refused: archive entry {e.filename[:100]!r} is compressed "
                                  f"({e.compress_size} bytes that unpack to {e.file_size}); only stored entries "
                                  f"are accepted, nothing is decompressed; {fix}")
        if e.flag_bits & 0x1:
            raise InvalidArgument(f"{what} refused: archive entry {e.filename[:100]!r} is encrypted; {fix}")
        total += e.file_size
    if total > len(data):
        raise InvalidArgument(f"{what} refused: its archive entries add up to {total} bytes, more than the "
                              f"{len(data)} bytes received (overlapping or forged sizes); {fix}")
    return zf, infos


def check_archive(data: bytes) -> None:
    """Refuse, before anything is decompressed or allocated, an archive that would unpack to more than it is.

    torch.save writes a zip of *stored* (uncompressed) entries; anything else is
    refused by `stored_zip`. The legacy (pre-zip) format is refused too: it
    allocates the sizes its pickle declares before reading any data.
    """
    if not data.startswith(b"PK"):
        raise InvalidArgument("checkpoint refused: it is not a torch.save zip archive (random bytes, a bare pickle "
                              "or the legacy pre-1.6 format); save it with torch.save and load it with "
                              "weights_only=True")
    stored_zip(data, "checkpoint", "save the checkpoint with torch.save", MAX_ARCHIVE_ENTRIES)


def from_bytes(data: bytes) -> Any:
    """Load checkpoint bytes with weights_only=True; anything unsafe or broken is an InvalidArgument.

    The archive is checked first (`check_archive`): nothing unpacks to more bytes than were given.
    """
    check_archive(data)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArgument(f"checkpoint refused: it is not plain data loadable with weights_only=True ({first})") from None
    except Exception as exc:
        raise InvalidArgument(f"checkpoint could not be read (truncated or not a torch.save file): {type(exc).__name__}: {exc}") from None


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` writes the whole file to `tmp`, a sibling of `path`, which then replaces `path` in one
    step: a crash mid-write leaves the old file (or none), never a truncated one. On failure the
    sibling is removed and the error raised."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: torch.save(ckpt, tmp))


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
    for k, v in state.items():
        if v.layout != torch.strided or v.is_quantized or v.is_nested or v.device.type != "cpu" \
                or type(v) not in (torch.Tensor, nn.Parameter):
            raise InvalidArgument(f"checkpoint tensor {k[:100]!r} is not a plain dense CPU tensor "
                                  f"({type(v).__name__}, layout {v.layout}, device {v.device}); save the "
                                  "model's state_dict() as it is (no sparse, quantized or meta tensors)")
        if v.dtype not in TENSOR_DTYPES:
            raise InvalidArgument(f"checkpoint tensor {k[:100]!r} has dtype {v.dtype}; weights must be real "
                                  "numbers (float16/bfloat16/float32/float64), integers or bool")
    return ckpt


def check_state(model: nn.Module, state: dict[str, torch.Tensor], *, model_name: str = "model") -> None:
    """What `load_state` checks before loading: the same keys and shapes as the model, and finite weights."""
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
            parts.append(f"unexpected keys {[k[:100] for k in unexpected[:5]]}{'...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}")
        raise InvalidArgument(f"checkpoint does not fit {model_name}: {'; '.join(parts)}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InvalidArgument(f"checkpoint for {model_name} holds NaN or Inf in {bad[:5]}; "
                              "push weights from before training diverged")


def load_state(model: nn.Module, state: dict[str, torch.Tensor], *, model_name: str = "model") -> None:
    """Load a state dict strictly; a mismatch says which keys and shapes differ (`check_state`)."""
    check_state(model, state, model_name=model_name)
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
