"""Exported programs: a model the server has no code for, loaded without running anything it names."""

import copy
import io
import json
import os
import random
import subprocess
import sys
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dataselect.errors import InvalidArgument
from dataselect.exported import (ENTRIES, SYM_FUNCTIONS, ExportedModel, aten_operator, export_model,
                                 load_exported)


# -- models -------------------------------------------------------------------------------------

class TabularMLP(nn.Module):
    def __init__(self, d_in=20, hidden=16, classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, hidden),
                                  nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.body(x))


class ScaledOutput(nn.Module):
    """Its final nn.Linear is followed by a scale, so that layer's output is not the model's output."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(20, 4)

    def forward(self, x):
        return self.fc(x) * 2.0


class Odd(nn.Module):
    """Tied weights, a non-persistent buffer and a constant made in forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.register_buffer("shift", torch.linspace(-1, 1, 6), persistent=False)
        self.out = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.tanh(self.b(torch.relu(self.a(x)) + self.shift)) * torch.tensor([1.5])
        return self.out(h.double().float())  # dtype arguments in the graph


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(20, 3)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: not capturable
            return self.fc(x)
        return self.fc(-x)


def final_input(model, layer, x):
    seen = []
    h = layer.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    try:
        z = model(x)
    finally:
        h.remove()
    return seen[-1], z


@pytest.fixture(scope="module")
def resnet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(3, 3, 32, 32)
    return model, x, export_model(model, x)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(1)
    model = TabularMLP()
    x = torch.randn(1, 20)  # a batch of one still exports a dynamic batch dimension
    return model, x, export_model(model, x)


def check_round_trip(model, x, data, layer):
    loaded = load_exported(data)
    assert isinstance(loaded, ExportedModel)
    model.eval()
    with torch.no_grad():
        want_f, want_z = final_input(model, layer, x)
        got_f, got_z = loaded.features_logits(x)
        assert torch.allclose(loaded(x), want_z, atol=1e-5, rtol=1e-4)
    assert torch.allclose(got_z, want_z, atol=1e-5, rtol=1e-4)
    assert torch.allclose(got_f, want_f, atol=1e-5, rtol=1e-4)
    assert loaded.num_classes == want_z.shape[1] and loaded.feature_dim == want_f.shape[1]
    assert loaded.input_shape == tuple(x.shape[1:])
    assert list(loaded.state_dict()) == list(model.state_dict())
    sd = loaded.state_dict()
    assert torch.equal(sd[loaded.last_layer + ".weight"], layer.weight)
    assert torch.equal(sd[loaded.last_layer + ".bias"], layer.bias)
    assert loaded.final_layer.weight is dict(loaded.named_parameters())[loaded.last_layer + ".weight"]
    return loaded


def perturb(model):
    """New values for everything in the state dict (what a trainer pushes), each tensor once."""
    with torch.no_grad():
        for t in {id(t): t for t in model.state_dict().values()}.values():
            if t.is_floating_point():
                t.mul_(0.7).add_(0.05)


# -- round trips --------------------------------------------------------------------------------

def test_resnet18_round_trip_and_weight_updates(resnet):
    model, x, data = resnet
    loaded = check_round_trip(model, x, data, model.fc)
    assert loaded.last_layer == "fc" and loaded.num_classes == 10 and loaded.feature_dim == 512
    # Module hooks see none of the graph's work, so the program measures its own activations at load.
    from dataselect.engine import activation_bytes_per_sample

    eager = activation_bytes_per_sample(model.eval(), x[:1])
    assert 0.5 * eager <= loaded.activation_bytes_per_sample <= 4 * eager
    xb = torch.randn(5, 3, 32, 32)  # another batch size than the example's
    model = copy.deepcopy(model)  # the fixture's model stays as exported
    perturb(model)
    loaded.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(loaded(xb), model.eval()(xb), atol=1e-5, rtol=1e-4)


def test_resnet18_gradients_flow(resnet):
    model, _, data = resnet
    loaded = load_exported(data)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 7])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    F.cross_entropy(loaded(xa), y).backward()
    F.cross_entropy(model(xb), y).backward()
    assert xa.grad is not None and xa.grad.abs().sum() > 0
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5, rtol=1e-3)
    g = dict(loaded.named_parameters())["layer1.0.conv1.weight"].grad
    assert g is not None and torch.allclose(g, model.layer1[0].conv1.weight.grad, atol=1e-5, rtol=1e-3)


def per_sample_norms_func(model, x, y):
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, b, xi, yi):
        return F.cross_entropy(functional_call(model, (p, b), (xi.unsqueeze(0),)), yi.unsqueeze(0))

    g = vmap(grad(loss_one), in_dims=(None, None, 0, 0))(params, buffers, x, y)
    return sum(t.flatten(1).pow(2).sum(1) for t in g.values()).sqrt()


def per_sample_norms_loop(model, x, y):
    norms = []
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        norms.append(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None).sqrt())
    return torch.stack(norms)


def test_mlp_round_trip_per_sample_gradients(mlp):
    model, _, data = mlp
    x = torch.randn(4, 20)
    loaded = check_round_trip(model, x, data, model.head)
    assert loaded.last_layer == "head" and loaded.input_shape == (20,)
    y = torch.tensor([0, 2, 1, 2])
    vmapped = per_sample_norms_func(loaded, x, y)
    assert torch.allclose(vmapped, per_sample_norms_loop(loaded, x, y), rtol=1e-4, atol=1e-6)
    assert torch.allclose(vmapped, per_sample_norms_loop(model, x, y), rtol=1e-4, atol=1e-6)
    model = copy.deepcopy(model)
    perturb(model)
    loaded.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5, rtol=1e-4)


def test_resnet18_per_sample_gradients_with_torch_func(resnet):
    model, _, data = resnet
    loaded = load_exported(data)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 4])
    assert torch.allclose(per_sample_norms_func(loaded, x, y), per_sample_norms_loop(loaded, x, y), rtol=1e-3)


def test_tied_weights_buffers_and_constants():
    torch.manual_seed(2)
    model = Odd()
    x = torch.randn(3, 6)
    loaded = check_round_trip(model, x, export_model(model, x), model.out)
    assert loaded.a.weight is loaded.b.weight  # still tied
    assert "shift" not in loaded.state_dict() and torch.equal(loaded.shift, model.shift)
    perturb(model)
    loaded.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_copies_are_independent_and_follow_dtype_casts(mlp):
    model, _, data = mlp
    loaded = load_exported(data)
    twin = copy.deepcopy(loaded)
    x = torch.randn(3, 20)
    with torch.no_grad():
        twin.head.weight.add_(1.0)
        assert not torch.allclose(twin(x), loaded(x))
        wide = copy.deepcopy(loaded).double()
        assert wide(x.double()).dtype == torch.float64
        assert torch.allclose(wide(x.double()).float(), loaded(x), atol=1e-5)
    with pytest.raises(InvalidArgument, match=r"inputs \[N, 20\]"):
        loaded(torch.randn(3, 21))


def test_final_layer_without_bias():
    model = nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 3, bias=False))
    x = torch.randn(2, 20)
    loaded = check_round_trip_no_bias(model, x)
    assert loaded.final_layer.bias is None and "2.bias" not in loaded.state_dict()


def check_round_trip_no_bias(model, x):
    loaded = load_exported(export_model(model, x))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x), atol=1e-6)
    assert loaded.last_layer == "2" and torch.equal(loaded.final_layer.weight, model[2].weight)
    return loaded


def test_allowlist():
    assert aten_operator("torch.ops.aten.convolution.default") is torch.ops.aten.convolution.default
    for target, why in [("torch.ops.aten.relu_.default", "mutates"), ("torch.ops.aten.empty_strided.default",
                                                                       "uninitialised"),
                        ("torch.ops.aten.linear.default", "core ATen"), ("torch.ops.aten.nope.default", "does not have"),
                        ("torch.ops.aten.relu.nope", "does not have"), ("torch.ops.aten.relu", "not allowed")]:
        with pytest.raises(InvalidArgument, match=why):
            aten_operator(target)
    assert set(SYM_FUNCTIONS) >= {"_operator.mul", "_operator.floordiv", "torch.sym_max"}
    with pytest.raises(InvalidArgument, match="64 bits"):
        SYM_FUNCTIONS["_operator.mul"](1 << 40, 1 << 40)
    with pytest.raises(InvalidArgument, match="Python numbers"):
        SYM_FUNCTIONS["_operator.add"](torch.ones(1), 1)


def test_training_mode_is_restored_and_dropout_is_off():
    model = nn.Sequential(nn.Linear(20, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    x = torch.randn(4, 20)
    loaded = load_exported(export_model(model, x))
    assert model.training
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x), atol=1e-6)


# -- export errors ------------------------------------------------------------------------------

def test_last_layer_that_is_not_the_output_is_refused():
    model, x = ScaledOutput(), torch.randn(2, 20)
    with pytest.raises(InvalidArgument, match="last_layer="):
        export_model(model, x)
    with pytest.raises(InvalidArgument, match="last_layer='fc': its output is not the model's output"):
        export_model(model, x, last_layer="fc")
    with pytest.raises(InvalidArgument, match=r"last_layer='nope'.*nn.Linear layers are: fc"):
        export_model(model, x, last_layer="nope")


def test_untraceable_model_names_the_fix_and_the_cause():
    with pytest.raises(InvalidArgument, match="torch.export could not capture Branchy") as e:
        export_model(Branchy(), torch.randn(2, 20))
    assert "torch.where" in str(e.value) and "data-dependent expression" in str(e.value)  # the cause, first line


def test_bad_example_or_output():
    with pytest.raises(InvalidArgument, match=r"\[N, \.\.\.\]"):
        export_model(TabularMLP(), torch.randn(20))
    with pytest.raises(InvalidArgument, match=r"logits \[N, C\]"):
        export_model(nn.Sequential(nn.Linear(20, 3), nn.Flatten(0)), torch.randn(2, 20))


# -- malicious archives -------------------------------------------------------------------------

def unpack(data):
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def pack(entries, compression=zipfile.ZIP_STORED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, blob in entries.items():
            zf.writestr(name, blob)
    return buf.getvalue()


def with_program(data, edit):
    entries = unpack(data)
    program = json.loads(entries["program.json"])
    edit(program)
    entries["program.json"] = json.dumps(program).encode()
    return pack(entries)


class Payload:
    """Unpickling this creates `path` (harmless: a marker that code ran)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("entry", ["state_dict.pt", "constants.pt"])
@pytest.mark.parametrize("form", ["torch.save", "raw pickle"])
def test_pickle_payload_in_a_tensor_blob_is_refused_and_never_runs(mlp, tmp_path, entry, form):
    import pickle

    marker = tmp_path / "ran"
    entries = unpack(mlp[2])
    entries[entry] = saved({"head.weight": Payload(marker)}) if form == "torch.save" else pickle.dumps(
        {"head.weight": Payload(marker)})
    with pytest.raises(InvalidArgument, match=entry):
        load_exported(pack(entries))
    assert not marker.exists()


def test_the_same_payload_runs_under_torch_export_load(tmp_path):
    """Evidence for the module docstring: torch's own loader executes the payload our loader refuses."""
    marker = tmp_path / "ran"
    ep = torch.export.export(nn.Linear(4, 3).eval(), (torch.randn(2, 4),))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    entries = unpack(buf.getvalue())
    (sample,) = [n for n in entries if n.endswith("sample_inputs/model.pt")]
    entries[sample] = saved({"x": Payload(marker)})
    path = tmp_path / "evil.pt2"
    path.write_bytes(pack(entries))
    subprocess.run([sys.executable, "-c", f"import torch; torch.export.load({str(path)!r})"],
                   capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert marker.exists()


def set_first(program, target):
    program["graph_module"]["graph"]["nodes"][0]["target"] = target


@pytest.mark.parametrize("target", [
    "builtins.eval", "os.system", "torch.ops.mylib.custom.default", "torch.ops.higher_order.cond",
    "torch.ops.aten.from_file.default", "torch.ops.aten.empty.memory_format", "torch.ops.aten.add_.Tensor",
    "torch.ops.aten.__class__.default", "torch.save", "_operator.getitem", "_operator.pow", "math.__import__",
])
def test_targets_off_the_allowlist_are_refused(mlp, target):
    data = with_program(mlp[2], lambda p: set_first(p, target))
    with pytest.raises(InvalidArgument) as e:
        load_exported(data)
    assert target.removeprefix("torch.ops.").split(".")[-2] in str(e.value)


def test_strings_torch_would_evaluate_are_never_read(mlp, tmp_path):
    """Symbolic shapes (sympify evaluates them), guards code and node names are not code to us."""
    marker = tmp_path / "ran"
    code = f"__import__('builtins').open({str(marker)!r}, 'w')"

    def edit(p):
        g = p["graph_module"]["graph"]
        for v in g["sym_int_values"].values():
            v["as_expr"]["expr_str"] = code
        p["guards_code"] = [code]
        node = g["nodes"][0]
        old = node["outputs"][0]["as_tensor"]["name"]
        new = f"x = 1; {code} #"
        node["outputs"][0]["as_tensor"]["name"] = new
        node["name"] = new
        for n in g["nodes"][1:]:
            for a in n["inputs"]:
                if a["arg"].get("as_tensor") == {"name": old}:
                    a["arg"]["as_tensor"]["name"] = new

    model, _, data = mlp
    loaded = load_exported(with_program(data, edit))
    x = torch.randn(3, 20)
    with torch.no_grad():
        assert torch.allclose(loaded(x), load_exported(data)(x))
    assert not marker.exists()


def test_unsupported_program_features_are_refused(mlp):
    def custom_obj(p):
        g = p["graph_module"]
        g["graph"]["inputs"].insert(0, {"as_custom_obj": {"name": "obj", "class_fqn": "__torch__.evil"}})
        g["signature"]["input_specs"].insert(0, {"custom_obj": {"arg": {"name": "obj", "class_fqn": "x"},
                                                                "custom_obj_name": "obj"}})

    def subgraph(p):
        p["graph_module"]["graph"]["nodes"][0]["inputs"][0]["arg"] = {"as_graph": {"name": "g", "graph": {}}}

    def mutation(p):
        p["graph_module"]["signature"]["output_specs"][0] = {
            "buffer_mutation": {"arg": {"name": "x"}, "buffer_name": "body.0.weight"}}

    def schema(p):
        p["schema_version"]["major"] += 1

    for edit, message in [(custom_obj, "custom"), (subgraph, "as_graph"), (mutation, "user output"),
                          (schema, "schema")]:
        with pytest.raises(InvalidArgument, match=message):
            load_exported(with_program(mlp[2], edit))


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_tensor_blobs_must_be_plain_dense_tensors(mlp):
    entries = unpack(mlp[2])
    state = torch.load(io.BytesIO(entries["state_dict.pt"]), weights_only=True)
    w = state["head.weight"]
    for bad, message in [(w.to_sparse(), "dense"), (nn.Parameter(w), "plain tensor"), ([1, 2], "plain tensor")]:
        entries["state_dict.pt"] = saved({**state, "head.weight": bad})
        with pytest.raises(InvalidArgument, match=message):
            load_exported(pack(entries))
    entries["state_dict.pt"] = saved({**state, "extra": w})
    with pytest.raises(InvalidArgument, match="does not use: extra"):
        load_exported(pack(entries))


def test_huge_intermediate_is_refused_before_any_allocation(mlp):
    def edit(p):
        g = p["graph_module"]["graph"]
        inp = g["inputs"][-1]["as_tensor"]["name"]
        g["nodes"][:0] = [
            {"target": "torch.ops.aten.expand.default", "outputs": [{"as_tensor": {"name": "big"}}],
             "inputs": [{"name": "self", "arg": {"as_tensor": {"name": inp}}},
                        {"name": "size", "arg": {"as_ints": [1 << 20, 1 << 10, 2, 20]}}]},
            {"target": "torch.ops.aten.clone.default", "outputs": [{"as_tensor": {"name": "copy"}}],
             "inputs": [{"name": "self", "arg": {"as_tensor": {"name": "big"}}}]},
        ]

    with pytest.raises(InvalidArgument, match="bytes per sample"):
        load_exported(with_program(mlp[2], edit))


def test_damaged_oversize_and_compressed_archives_are_refused(mlp):
    data = mlp[2]
    rng = random.Random(0)
    cases = {
        "truncated": data[: len(data) // 2],
        "random": bytes(rng.getrandbits(8) for _ in range(4096)),
        "empty": b"",
        "not a zip of ours": pack({"a.txt": b"hi"}),
        "deep json": pack({**unpack(data), "program.json": b"[" * 200_000 + b"]" * 200_000}),
        # 64 MiB of zeros deflate to ~64 KiB: never inflated
        "bomb": pack({**unpack(data), "state_dict.pt": bytes(64 << 20)}, zipfile.ZIP_DEFLATED),
    }
    inner = unpack(data)
    zin = zipfile.ZipFile(io.BytesIO(inner["state_dict.pt"]))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info in zin.infolist():
            zf.writestr(info.filename, zin.read(info))
    inner["state_dict.pt"] = buf.getvalue()
    cases["inner bomb"] = pack(inner)
    for name, blob in cases.items():
        with pytest.raises(InvalidArgument):
            load_exported(blob)
    with pytest.raises(InvalidArgument, match="over the limit"):
        load_exported(data, max_bytes=len(data) - 1)
    with pytest.raises(InvalidArgument, match="bytes"):
        load_exported("not bytes")


def _repacked(data: bytes, *, deflate: bool = False, encrypted: bool = False) -> bytes:
    """The same entries, deflated, or with every entry flagged as encrypted (all a reader sees before decrypting)."""
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as zf:
        for info in src.infolist():
            zf.writestr(info.filename, src.read(info))
    blob = bytearray(out.getvalue())
    if encrypted:  # set bit 0 of the flags in each local header (offset 6) and central record (offset 8)
        zf = zipfile.ZipFile(io.BytesIO(bytes(blob)))
        at = zf.start_dir
        for info in zf.infolist():
            blob[info.header_offset + 6] |= 0x1
            assert blob[at:at + 4] == b"PK\x01\x02"
            blob[at + 8] |= 0x1
            at += 46 + int.from_bytes(blob[at + 28:at + 30], "little") + int.from_bytes(
                blob[at + 30:at + 32], "little") + int.from_bytes(blob[at + 32:at + 34], "little")
    return bytes(blob)


@pytest.mark.parametrize("kind", ["deflate", "encrypted"])
def test_checkpoints_and_exported_programs_share_one_archive_guard(mlp, kind):
    from dataselect.checkpoint import from_bytes

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    word = "compressed" if kind == "deflate" else "encrypted"
    for load, data, fix in ((from_bytes, buf.getvalue(), "torch.save"),
                            (load_exported, mlp[2], "export_model")):
        load(data)  # the untouched archive loads
        with pytest.raises(InvalidArgument, match=f"refused: archive entry .* is {word}.*{fix}"):
            load(_repacked(data, **{kind: True}))


def junk(rng):
    return rng.choice([None, "", "x", -1, 2**70, 1.5, [], {}, [[[]]], {"as_int": "1"}, True, "NaN"])


def mutate(obj, rng):
    """Replace one random value somewhere in a JSON tree."""
    path = []
    while True:
        keys = list(obj) if isinstance(obj, dict) else list(range(len(obj))) if isinstance(obj, list) else []
        if not keys or (path and rng.random() < 0.3):
            break
        k = rng.choice(keys)
        if not isinstance(obj[k], (dict, list)) or rng.random() < 0.2:
            obj[k] = junk(rng)
            return
        path.append(k)
        obj = obj[k]
    if isinstance(obj, dict) and obj:
        obj[rng.choice(list(obj))] = junk(rng)
    elif isinstance(obj, list) and obj:
        obj[rng.randrange(len(obj))] = junk(rng)


@pytest.mark.parametrize("entry", ["program.json", "manifest.json"])
def test_fuzzed_json_gives_invalid_argument_or_a_model(mlp, entry):
    rng = random.Random(entry)
    entries = unpack(mlp[2])
    original = json.loads(entries[entry])
    x = torch.randn(2, 20)
    for _ in range(60):
        tree = json.loads(json.dumps(original))
        for _ in range(rng.randint(1, 3)):
            mutate(tree, rng)
        try:
            loaded = load_exported(pack({**entries, entry: json.dumps(tree).encode()}))
        except InvalidArgument:
            continue
        with torch.no_grad():
            try:
                loaded(x)
            except InvalidArgument:
                pass
            except RuntimeError:
                pass  # a program can be well formed and still compute something else; it stays in torch's kernels


def test_entries_are_the_documented_ones(mlp):
    assert sorted(unpack(mlp[2])) == sorted(ENTRIES)
    manifest = json.loads(unpack(mlp[2])["manifest.json"])
    assert manifest["last_layer"] == "head" and manifest["input_shape"] == [20]
    assert "stack_trace" not in unpack(mlp[2])["program.json"].decode()
