"""Model registry protocol and checkpoints (data, never code)."""

import io
import pickle

import pytest
import torch

from dataselect.checkpoint import (
    build_from_checkpoint,
    from_bytes,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
    to_bytes,
)
from dataselect.errors import InvalidArgument
from dataselect.models import build_model

MNIST_KW = dict(num_classes=10, in_channels=1, image_size=28, mean=(0.1307,), std=(0.3081,))
CIFAR_KW = dict(num_classes=10, in_channels=3, image_size=32, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


@pytest.mark.parametrize("name", ["cnn-small", "cnn-deep", "mlp", "resnet18"])
@pytest.mark.parametrize("kw", [MNIST_KW, CIFAR_KW], ids=["28x28x1", "32x32x3"])
def test_every_model_follows_the_protocol(name, kw):
    model = build_model(name, **kw).eval()
    x = torch.randint(0, 256, (2, kw["in_channels"], kw["image_size"], kw["image_size"]), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(x)
        h = model.features(x)
        assert logits.shape == (2, 10)
        assert torch.allclose(model.classifier(h), logits, atol=1e-5)
        # uint8 and the same image as [0, 1] floats give the same output
        assert torch.allclose(model(x.float() / 255), logits, atol=1e-5)


def test_cnn_deep_is_deeper_than_cnn_small():
    def convs(m):
        return sum(isinstance(mod, torch.nn.Conv2d) for mod in m.modules())

    assert convs(build_model("cnn-small", **MNIST_KW)) == 2
    assert convs(build_model("cnn-deep", **MNIST_KW)) >= 4
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in build_model("cnn-deep", **MNIST_KW).modules())


def test_checkpoint_round_trip(tmp_path):
    model = build_model("cnn-small", **MNIST_KW)
    ckpt = make_checkpoint("cnn-small", MNIST_KW, model, version=3, step=7)
    path = tmp_path / "c.pt"
    save_checkpoint(ckpt, path)
    loaded = load_checkpoint(path)
    assert loaded["version"] == 3 and loaded["model"] == "cnn-small"
    rebuilt = build_from_checkpoint(loaded)
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_mismatched_checkpoint_names_the_keys():
    ckpt = make_checkpoint("cnn-small", MNIST_KW, build_model("cnn-small", **MNIST_KW))
    ckpt["model"] = "mlp"
    ckpt["kwargs"] = MNIST_KW
    with pytest.raises(InvalidArgument, match="does not fit mlp: missing keys"):
        build_from_checkpoint(ckpt)


def test_truncated_and_non_dict_checkpoints_are_refused():
    data = to_bytes(make_checkpoint("mlp", MNIST_KW, build_model("mlp", **MNIST_KW)))
    with pytest.raises(InvalidArgument, match="truncated"):
        from_bytes(data[: len(data) // 2])
    buf = io.BytesIO()
    torch.save([1, 2, 3], buf)
    with pytest.raises(InvalidArgument, match="must be a dict"):
        load_checkpoint(buf.getvalue())


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_in_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    data = pickle.dumps({"state_dict": {}, "evil": _Payload(str(marker))})
    with pytest.raises(InvalidArgument, match="weights_only"):
        from_bytes(data)
    assert not marker.exists()
