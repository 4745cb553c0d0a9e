"""The wire format for tensors: exact round trips and clear refusals."""

import pytest
import torch

from dataselect import codec
from dataselect.errors import InvalidArgument
from dataselect.v1 import selection_pb2 as pb


def _sample(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(3, 5, generator=g) > 0.5
    if dtype.is_floating_point:
        # Include values that only survive a bit-exact copy (negatives, tiny, large).
        base = torch.tensor([[-1.5, 0.0, 3.25e-3, 1234.5, -7.0]]).repeat(3, 1)
        return (base * torch.rand(3, 5, generator=g)).to(dtype)
    info = torch.iinfo(dtype)
    return torch.tensor([[info.min, -1 if info.min < 0 else 0, 0, 1, info.max]] * 3, dtype=dtype)


@pytest.mark.parametrize("name", list(codec.DTYPES))
def test_round_trip_every_dtype(name):
    dtype = codec.DTYPES[name]
    t = _sample(dtype)
    msg = codec.encode(t)
    assert msg.dtype == name
    assert list(msg.shape) == [3, 5]
    assert len(msg.data) == t.numel() * t.element_size()
    back = codec.decode(pb.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_non_contiguous_tensor_round_trips_in_logical_order():
    t = torch.arange(12, dtype=torch.int32).reshape(3, 4).t()
    assert torch.equal(codec.decode(codec.encode(t)), t)


@pytest.mark.parametrize("shape", [(0,), (0, 3, 28, 28), (5, 0)])
def test_empty_tensors(shape):
    t = torch.empty(shape, dtype=torch.float32)
    msg = codec.encode(t)
    assert msg.data == b""
    back = codec.decode(msg)
    assert back.shape == t.shape and back.dtype == torch.float32


def test_scalar_round_trip():
    t = torch.tensor(2.5, dtype=torch.float64)
    back = codec.decode(codec.encode(t))
    assert back.shape == () and float(back) == 2.5


def test_little_endian_layout():
    msg = codec.encode(torch.tensor([1], dtype=torch.int32))
    assert msg.data == b"\x01\x00\x00\x00"


def test_bytes_not_matching_shape_are_refused():
    msg = pb.Tensor(dtype="float32", shape=[2, 3], data=b"\x00" * 20)
    with pytest.raises(InvalidArgument, match=r"20 bytes do not match dtype float32 x shape \[2, 3\].*24"):
        codec.decode(msg, name="inputs")


def test_unknown_dtype_is_refused_listing_known_ones():
    with pytest.raises(InvalidArgument, match=r"unknown dtype 'complex64'.*bfloat16"):
        codec.decode(pb.Tensor(dtype="complex64", shape=[1], data=b"\x00" * 8))


def test_negative_dimension_is_refused():
    with pytest.raises(InvalidArgument, match="negative"):
        codec.decode(pb.Tensor(dtype="uint8", shape=[-1], data=b""))


def test_unsupported_dtype_cannot_be_encoded():
    with pytest.raises(InvalidArgument, match="cannot encode"):
        codec.encode(torch.zeros(2, dtype=torch.complex64))


def test_is_set_distinguishes_unset_fields():
    assert not codec.is_set(pb.SelectRequest().inputs)
    assert codec.is_set(codec.encode(torch.empty(0, dtype=torch.uint8)))


_WARNINGS_PROBE = r"""
import warnings

import torch  # noqa: F401  (torch's own import may add filters; they are not ours)
from dataselect.v1 import selection_pb2 as pb

before = list(warnings.filters)
from dataselect import codec

assert warnings.filters == before, "importing dataselect.codec changed warnings.filters"
warnings.simplefilter("error")  # the read-only-buffer warning, if it escaped, would raise here
during = list(warnings.filters)
msg = pb.Tensor.FromString(codec.encode(torch.arange(6, dtype=torch.float32)).SerializeToString())
for _ in range(2):
    assert codec.decode(msg).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
assert warnings.filters == during, "decoding changed warnings.filters"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    warnings.warn("The given buffer is not writable (a user's own warning)", UserWarning)
assert len(caught) == 1, "a user's warning with the same text was swallowed"
print("ok")
"""


def test_codec_leaves_the_process_warnings_filters_alone():
    """Importing and using the codec installs no process-wide filter, and torch's read-only-buffer
    warning still never reaches the user (a fresh process: torch gives it once per process)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _WARNINGS_PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert "not writable" not in out.stderr
