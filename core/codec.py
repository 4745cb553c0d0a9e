"""Tensors on the wire: `{dtype, shape, bytes}` with raw little-endian buffers.

Decoding is zero-copy: the returned tensor shares memory with the message
bytes, so callers treat it as read-only (every consumer in dataselect makes a
new tensor before changing anything, e.g. when normalising images).
"""

from __future__ import annotations

import sys
import threading
import warnings

import torch

from dataselect.errors import InvalidArgument
from dataselect.v1 import selection_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "bool": torch.bool,
}
#: More dimensions than any pool needs (torch itself stops at 64).
MAX_RANK = 8
#: Largest number of elements a shape may describe, counting zero-length dimensions as 1: torch
#: computes strides from the shape even for an empty tensor, and they must fit in int64.
MAX_ELEMENTS = 2**48
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

#: torch.frombuffer warns (once per process) that protobuf's bytes are read-only; decoded
#: tensors are read-only by design (see the module docstring), so the first call that can
#: warn runs with that one warning ignored. Nothing is changed for the rest of the process.
_READ_ONLY_WARNING = "The given buffer is not writable"
_read_only_warning_spent = False
_read_only_warning_lock = threading.Lock()

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
    raise ImportError("dataselect's wire format is little-endian; this machine is big-endian")


def encode(tensor: torch.Tensor) -> pb.Tensor:
    """Encode a CPU or device tensor as a wire Tensor (copies to host once)."""
    if tensor.dtype not in DTYPE_NAMES:
        raise InvalidArgument(f"cannot encode dtype {tensor.dtype}; supported: {', '.join(DTYPES)}")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        data = t.view(torch.int16).numpy().tobytes()
    else:
        data = t.numpy().tobytes()
    return pb.Tensor(dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape), data=data)


def decode(msg: pb.Tensor, *, name: str = "tensor") -> torch.Tensor:
    """Decode a wire Tensor, checking dtype and that the bytes match dtype x shape."""
    if msg.dtype not in DTYPES:
        raise InvalidArgument(
            f"{name}: unknown dtype {msg.dtype!r}; use one of: {', '.join(DTYPES)}"
        )
    dtype = DTYPES[msg.dtype]
    shape = tuple(int(s) for s in msg.shape)
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"{name}: shape {list(shape)[:MAX_RANK + 1]}... has more than {MAX_RANK} dimensions")
    if any(s < 0 for s in shape):
        raise InvalidArgument(f"{name}: negative dimension in shape {list(shape)}")
    numel, span = 1, 1
    for s in shape:
        numel *= s
        span *= max(s, 1)
    if span > MAX_ELEMENTS:
        raise InvalidArgument(f"{name}: shape {list(shape)} describes more than 2**48 elements (dimensions this large "
                              "overflow even an empty tensor's strides); send the shape of the data sent")
    itemsize = torch.empty((), dtype=dtype).element_size()
    data = msg.data  # read once: each read of a bytes field makes a new copy of the payload
    if len(data) != numel * itemsize:
        raise InvalidArgument(
            f"{name}: {len(data)} bytes do not match dtype {msg.dtype} x shape {list(shape)} "
            f"(expected {numel * itemsize} bytes)"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return _frombuffer(data, dtype).reshape(shape)


def _frombuffer(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    """torch.frombuffer over read-only bytes, without its read-only warning.

    torch gives that warning once per process, so only the first call needs it
    silenced. `warnings.catch_warnings` swaps the process-wide filter list and is
    not thread-safe; the lock keeps concurrent first calls from interleaving, and
    later calls do not touch the filters at all.
    """
    global _read_only_warning_spent
    if not _read_only_warning_spent:
        with _read_only_warning_lock:
            if not _read_only_warning_spent:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=_READ_ONLY_WARNING, category=UserWarning)
                    tensor = torch.frombuffer(data, dtype=dtype)
                _read_only_warning_spent = True
                return tensor
    return torch.frombuffer(data, dtype=dtype)


def is_set(msg: pb.Tensor) -> bool:
    """True when an optional Tensor field was filled in."""
    return bool(msg.dtype)
