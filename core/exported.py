"""Models the server has no code for, shipped as a `torch.export` program.

The trainer calls `export_model(model, example)`: the model is exported in
eval mode, lowered to core ATen operators, and written to an archive of our
own; the server calls `load_exported(data)` and gets an `ExportedModel`, an
`nn.Module` whose parameters and buffers carry the original module's
state-dict keys and whose forward runs the exported graph.

Why not `torch.export.load`
---------------------------
`torch.export.load` is documented as unsafe for untrusted files, and reading
its code shows where it runs code an archive chooses: `deserialize_torch_artifact`
retries `torch.load(weights_only=False)` when the safe load fails (the sample
inputs and legacy constants go through it); pickled constants are loaded with
`weights_only=False` and opaque constants with `pickle.loads`; the graph's
symbolic shapes (`expr_str`) are parsed with `sympy.sympify`, which evaluates
Python expressions; node targets, metadata (`source_fn_stack`) and operator
arguments are resolved with `getattr` chains under `torch`, `math` and
`_operator`, or through registered extension handlers; node names become
identifiers in the Python code `torch.fx` generates and `exec`s; and
`ExportedProgram.module()` compiles the archive's `guards_code` strings. The
tests show the first of these executing a payload.

This loader uses none of that machinery.

What is parsed
--------------
* The archive is a zip of exactly four stored (uncompressed, unencrypted)
  entries: `manifest.json`, `program.json`, `state_dict.pt`, `constants.pt`.
  Its length is checked against `max_bytes` before anything is read, every
  entry's size is checked against its own limit, and the entries' sizes must
  add up to no more than the archive (so no entry is read twice through
  overlapping offsets, and nothing is decompressed).
* `manifest.json` and `program.json` are parsed with `json.loads` and then
  walked by our code with explicit type checks. `program.json` is torch's
  exported-program JSON schema (`torch._export.serde.serialize.serialize`);
  its major schema version must equal this torch's
  (`torch._export.serde.schema.SCHEMA_VERSION`). Only these fields are read:
  the graph's inputs, outputs and nodes (target, inputs, outputs) and the
  signature's input and output specs. Everything else (tensor metadata,
  symbolic shape expressions, range constraints, module call graph, tree
  specs, guards code, node metadata) is never interpreted.
* `state_dict.pt` and `constants.pt` are checked to be zips of stored entries
  (torch's own zip reader would also inflate deflated entries: a
  decompression bomb) whose sizes add up to no more than the blob; their
  entries are copied into a fresh zip written by us (so torch's reader never
  parses the archive's own zip structures), which is loaded only with
  `torch.load(weights_only=True, map_location="cpu")`, which
  unpickles nothing but tensors and plain containers. The result must be a
  plain dict of string keys to plain dense CPU tensors (no subclasses,
  parameters, sparse, quantized or nested tensors). Nothing is handed to
  torch's deserializer, so its `weights_only=False` fallback is never reached.

What the graph may name (the allowlist)
---------------------------------------
A node's target is looked up in one of two tables, never with `getattr` on a
module path, `import`, `eval` or `sympify`:
* `torch.ops.aten.<name>.<overload>` where `<name>` and `<overload>` are
  identifiers listed by the dispatcher for the `aten` namespace, and the
  operator is tagged `core` (the stable core ATen opset that `torch.export`
  lowers to: pure tensor maths, no file or network access) or is one of a
  few checks export inserts (`_assert_scalar`, `_assert_tensor_metadata`,
  `sym_constrain_range*`); operators with a mutable schema, and
  those returning uninitialised memory (`empty`, `empty_strided`) or drawing
  random numbers, are refused.
* Symbolic-size arithmetic (`_operator.add`, `mul`, `floordiv`, comparisons,
  `torch.sym_max`, `math.trunc`, ...): the name is a key into a table of our
  own small functions that accept only Python numbers and refuse integers
  beyond 64 bits.
Any other target (`builtins.eval`, `os.system`, custom operator namespaces,
higher-order operators such as `cond`, torchbind objects) is refused with its
name. Arguments may only be tensors named by earlier nodes, numbers, booleans,
strings, `None`, dtypes, layouts, memory formats and devices, or lists of
these; subgraphs, operator values and custom objects are refused. Devices in
the graph are replaced by the input's device.

What is never executed
----------------------
No Python code, pickle opcodes beyond `weights_only`'s allowlist, sympy
expressions, guard strings or generated source. The graph runs in a small
interpreter of ours: for each node it calls the allowlisted operator with the
values the node names; archive names are only ever dictionary keys.
State-dict keys become submodule and tensor names (entries of `nn.Module`'s
registries, as `add_module` and `register_parameter` make them) after
checking that they are dot-separated names without control characters that
do not clash with an existing attribute (so "forward" or "__class__" is
refused, not overwritten).

Before the model is returned, the graph is run once on meta tensors (shapes
only, no data, no memory): this type-checks every call, checks that the
outputs are features `[N, D]` and logits `[N, C]` matching the manifest and
the final linear layer's weights, and bounds every intermediate tensor's size
per sample, so a program cannot ask the server for absurd allocations.

What remains trusted
--------------------
torch itself: the `weights_only` unpickler (and any globals the server process
registers with `torch.serialization.add_safe_globals`; the server registers
none), the zip reader, and the core ATen kernels, which check their arguments
(shapes, index bounds on CPU). A graph can still cost compute in proportion to
its size (bounded by the node limit) and, on CUDA, an out-of-range index in
`index`/`gather`/`embedding` is a device-side assert that spoils the CUDA
context: a denial of service, not code execution.
"""

from __future__ import annotations

import io
import json
import math
import operator
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from dataselect.checkpoint import stored_zip
from dataselect.errors import InvalidArgument, first_line

FORMAT = "dataselect-exported-program"
FORMAT_VERSION = 1
ENTRIES = ("manifest.json", "program.json", "state_dict.pt", "constants.pt")

#: Size limits (bytes) for the archive's parts, checked before they are read.
MAX_MANIFEST_BYTES = 16 << 20
MAX_PROGRAM_BYTES = 64 << 20
#: At most this many graph nodes and tensors.
MAX_NODES = 200_000
MAX_TENSORS = 100_000
#: Longest name (node, tensor key) accepted.
MAX_NAME = 1000
#: Largest intermediate tensor per sample the program may produce (checked on meta tensors at load).
MAX_ACTIVATION_BYTES_PER_SAMPLE = 1 << 30

TENSOR_DTYPES = frozenset({
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
})

#: A state-dict key: dot-separated module and tensor names (any characters but dots and controls, as
#: `nn.Module.add_module` allows: torchvision's RegNet has "block1-0"). Names are only dict keys.
_KEY = re.compile(r"[^.\x00-\x1f\x7f]+(\.[^.\x00-\x1f\x7f]+)*\Z")
#: torch.ops.aten.<name>.<overload>: identifiers, none starting with "__" (no dunder attributes).
_ATEN_TARGET = re.compile(
    r"torch\.ops\.aten\.([A-Za-z][A-Za-z0-9_]*|_[A-Za-z0-9][A-Za-z0-9_]*)\.([A-Za-z][A-Za-z0-9_]*)\Z")
_WRAPPED = "model"

#: Core ATen operators refused all the same: uninitialised memory could hand one client's
#: data to another, and random draws make scores irreproducible (a model in eval mode has none).
_DENIED_ATEN = frozenset({
    "empty.memory_format", "empty_strided.default", "rand.default", "randn.default",
    "randperm.default", "native_dropout.default",
})
#: Operators outside the core opset that export inserts as checks (of a size, a dtype): they compute nothing.
_EXTRA_ATEN = frozenset({"_assert_scalar.default", "_assert_tensor_metadata.default",
                         "sym_constrain_range.default", "sym_constrain_range_for_size.default"})


# -- archive ------------------------------------------------------------------------------------

def _stored_entries(blob: bytes, what: str, expected: tuple[str, ...] | None = None,
                    limits: dict[str, int] | None = None) -> dict[str, bytes]:
    """The entries of a zip whose entries are all stored, read after checking their sizes."""
    zf, infos = stored_zip(blob, what, "make it with dataselect.exported.export_model", MAX_TENSORS + 16)
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"{what} has duplicate entries")
    if expected is not None and sorted(names) != sorted(expected):
        raise InvalidArgument(f"{what} must hold exactly {', '.join(expected)}; it holds "
                              f"{', '.join(n[:80] for n in names[:10]) or 'nothing'}")
    for i in infos:
        limit = (limits or {}).get(i.filename)
        if limit is not None and i.file_size > limit:
            raise InvalidArgument(f"{what}: entry {i.filename!r} is {i.file_size} bytes, over its limit of {limit}")
    out = {}
    try:
        for i in infos:
            out[i.filename] = zf.read(i)
    except Exception as e:
        raise InvalidArgument(f"{what} is damaged ({first_line(e)})") from None
    return out


def _load_tensors(blob: bytes, what: str) -> dict[str, torch.Tensor]:
    """A dict of plain dense tensors saved with torch.save, loaded with weights_only=True.

    torch's zip reader would inflate deflated entries, so the entries are read here (stored ones only,
    sizes checked) and written to a fresh zip of our own: torch reads that, never the archive's bytes,
    so a zip the two readers parse differently cannot slip past the checks.
    """
    entries = _stored_entries(blob, what)
    fresh = io.BytesIO()
    with zipfile.ZipFile(fresh, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    del entries
    try:
        obj = torch.load(io.BytesIO(fresh.getvalue()), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InvalidArgument(f"{what} is not a dict of plain tensors loadable with weights_only=True "
                              f"({first_line(e)})") from None
    if type(obj) is not dict:
        raise InvalidArgument(f"{what} must hold a plain dict of tensors, not {type(obj).__name__}")
    if len(obj) > MAX_TENSORS:
        raise InvalidArgument(f"{what} holds {len(obj)} tensors, over the limit of {MAX_TENSORS}")
    for k, t in obj.items():
        if type(k) is not str or len(k) > MAX_NAME:
            raise InvalidArgument(f"{what}: keys must be strings of at most {MAX_NAME} characters")
        if type(t) is not torch.Tensor:
            raise InvalidArgument(f"{what}: {k!r} is a {type(t).__name__}, not a plain tensor")
        if t.layout != torch.strided or t.is_quantized or t.is_nested or t.device.type != "cpu":
            raise InvalidArgument(f"{what}: {k!r} is not a dense CPU tensor ({t.layout}, {t.device})")
        if t.dtype not in TENSOR_DTYPES:
            raise InvalidArgument(f"{what}: {k!r} has dtype {t.dtype}; accepted: "
                                  f"{', '.join(sorted(str(d) for d in TENSOR_DTYPES))}")
        if t.requires_grad:
            raise InvalidArgument(f"{what}: {k!r} must not require grad")
    return obj


def _save_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save({k: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
                for k, t in tensors.items()}, buf)
    return buf.getvalue()


def _write_archive(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in ENTRIES:
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), entries[name])
    return buf.getvalue()


def _json(blob: bytes, what: str) -> Any:
    try:
        return json.loads(blob.decode("utf-8"))
    except Exception as e:
        raise InvalidArgument(f"{what} is not valid UTF-8 JSON ({first_line(e)})") from None


# -- the operator allowlist ---------------------------------------------------------------------

def _int_result(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 1 << 63:
        raise InvalidArgument("symbolic size arithmetic overflowed 64 bits")
    return v


def _numbers(*args: Any) -> None:
    for a in args:
        if not isinstance(a, (int, float, bool)):
            raise InvalidArgument(f"size arithmetic takes Python numbers, not {type(a).__name__}")


def _sym(fn: Callable, arity: int) -> Callable:
    def call(*args: Any) -> Any:
        if len(args) != arity:
            raise InvalidArgument(f"size arithmetic expected {arity} argument(s), got {len(args)}")
        _numbers(*args)
        return _int_result(fn(*args))
    return call


def _sym_ite(b: Any, t: Any, f: Any) -> Any:
    _numbers(b, t, f)
    return t if b else f


#: Symbolic-size functions by their serialized name: our own implementations, chosen by key.
SYM_FUNCTIONS: dict[str, Callable] = {
    **{f"_operator.{name}": _sym(getattr(operator, name), 2) for name in (
        "add", "sub", "mul", "floordiv", "mod", "truediv", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_")},
    "_operator.neg": _sym(operator.neg, 1),
    "_operator.pos": _sym(operator.pos, 1),
    "math.trunc": _sym(math.trunc, 1),
    "torch.sym_not": _sym(operator.not_, 1),
    "torch.sym_int": _sym(int, 1),
    "torch.sym_float": _sym(float, 1),
    "torch.sym_max": _sym(max, 2),
    "torch.sym_min": _sym(min, 2),
    "torch.sym_sqrt": _sym(math.sqrt, 1),
    "torch.sym_ite": _sym_ite,
}


def aten_operator(target: str) -> torch._ops.OpOverload:
    """The allowlisted ATen operator a serialized target names, or InvalidArgument saying why not."""
    m = _ATEN_TARGET.match(target) if isinstance(target, str) else None
    if m is None:
        raise InvalidArgument(f"the program calls {str(target)[:200]!r}, which is not allowed: only core ATen "
                              "operators (torch.ops.aten.*) and size arithmetic may appear")
    name, overload = m.groups()
    short = f"{name}.{overload}"
    try:  # the dispatcher's registry of C++ operators: looking a name up imports and runs nothing
        packet = getattr(torch.ops.aten, name)
        known = isinstance(packet, torch._ops.OpOverloadPacket) and overload in packet.overloads()
    except Exception:
        known = False
    if not known:
        raise InvalidArgument(f"the program calls aten.{short}, which this torch does not have")
    op = getattr(packet, overload)
    if not isinstance(op, torch._ops.OpOverload) or op.namespace != "aten":
        raise InvalidArgument(f"the program calls aten.{short}, which is not an operator")
    if short in _DENIED_ATEN:
        raise InvalidArgument(f"the program calls aten.{short}, which is refused (uninitialised memory or "
                              "random numbers); export the model in eval mode without them")
    if op._schema.is_mutable:
        raise InvalidArgument(f"the program calls aten.{short}, which mutates its inputs; export in eval mode")
    if torch.Tag.core not in op.tags and short not in _EXTRA_ATEN:
        raise InvalidArgument(f"the program calls aten.{short}, which is outside the core ATen opset this "
                              "server runs; export with export_model (it lowers to core ATen)")
    return op


# -- the program: validated and compiled from the JSON ------------------------------------------

def _one(d: Any, what: str) -> tuple[str, Any]:
    if not isinstance(d, dict) or len(d) != 1:
        raise InvalidArgument(f"program: {what} must be an object with one key")
    ((k, v),) = d.items()
    return k, v


def _name(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v or len(v) > MAX_NAME:
        raise InvalidArgument(f"program: {what} must be a non-empty name of at most {MAX_NAME} characters")
    return v


def _tensor_name(arg: Any, what: str) -> str:
    if not isinstance(arg, dict) or set(arg) != {"name"}:
        raise InvalidArgument(f"program: {what} must name a tensor")
    return _name(arg["name"], what)


def _float(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise InvalidArgument(f"program: {what} must be a number")
    if isinstance(v, str):
        special = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}
        if v not in special:
            raise InvalidArgument(f"program: {what} must be a number")
        return special[v]
    return float(v)


def _int(v: Any, what: str) -> int:
    if type(v) is not int or abs(v) >= 1 << 63:
        raise InvalidArgument(f"program: {what} must be a 64-bit integer")
    return v


def _bool(v: Any, what: str) -> bool:
    if type(v) is not bool:
        raise InvalidArgument(f"program: {what} must be a boolean")
    return v


def _list(v: Any, what: str) -> list:
    if not isinstance(v, list):
        raise InvalidArgument(f"program: {what} must be a list")
    return v


class _Ref:
    """A value computed by an earlier node (or an input), looked up when the node runs."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Device:
    """The device of the input, whatever device the program was exported on."""


_DEVICE = _Device()


def _enum_tables() -> tuple[dict, dict, dict]:
    from torch._export.serde import serialize as s
    return s._SERIALIZE_TO_TORCH_DTYPE, s._SERIALIZE_TO_TORCH_LAYOUT, s._SERIALIZE_TO_TORCH_MEMORY_FORMAT


def _sym_value(v: Any, what: str, number: Callable) -> Any:
    kind, val = _one(v, what)
    if kind == "as_name":
        return _Ref(_name(val, what))
    if kind in ("as_int", "as_float", "as_bool"):
        return number(val, what)
    raise InvalidArgument(f"program: {what} has unsupported kind {kind[:60]!r}")


def _argument(arg: Any, what: str) -> Any:
    """A node argument as a constant, a _Ref, the _DEVICE marker, or a list of these."""
    kind, v = _one(arg, what)
    dtypes, layouts, formats = _enum_tables()
    if kind == "as_none":
        return None
    if kind == "as_tensor":
        return _Ref(_tensor_name(v, what))
    if kind == "as_tensors":
        return [_Ref(_tensor_name(t, what)) for t in _list(v, what)]
    if kind == "as_optional_tensors":
        out = []
        for t in _list(v, what):
            k, tv = _one(t, what)
            if k == "as_none":
                out.append(None)
            elif k == "as_tensor":
                out.append(_Ref(_tensor_name(tv, what)))
            else:
                raise InvalidArgument(f"program: {what} holds unsupported kind {k[:60]!r}")
        return out
    if kind == "as_int":
        return _int(v, what)
    if kind == "as_ints":
        return [_int(x, what) for x in _list(v, what)]
    if kind == "as_float":
        return _float(v, what)
    if kind == "as_floats":
        return [_float(x, what) for x in _list(v, what)]
    if kind == "as_bool":
        return _bool(v, what)
    if kind == "as_bools":
        return [_bool(x, what) for x in _list(v, what)]
    if kind == "as_string":
        if not isinstance(v, str) or len(v) > MAX_NAME:
            raise InvalidArgument(f"program: {what} must be a short string")
        return v
    if kind == "as_sym_int":
        return _sym_value(v, what, _int)
    if kind == "as_sym_ints":
        return [_sym_value(x, what, _int) for x in _list(v, what)]
    if kind == "as_sym_float":
        return _sym_value(v, what, _float)
    if kind == "as_sym_floats":
        return [_sym_value(x, what, _float) for x in _list(v, what)]
    if kind == "as_sym_bool":
        return _sym_value(v, what, _bool)
    if kind == "as_sym_bools":
        return [_sym_value(x, what, _bool) for x in _list(v, what)]
    if kind == "as_scalar_type":
        table = dtypes
    elif kind == "as_layout":
        table = layouts
    elif kind == "as_memory_format":
        table = formats
    elif kind == "as_device":
        if not isinstance(v, dict):
            raise InvalidArgument(f"program: {what} must be a device")
        return _DEVICE
    else:
        raise InvalidArgument(f"program: {what} is a {kind[:60]!r} argument, which is not supported (only tensors, "
                              "numbers, booleans, strings, dtypes, layouts, memory formats and devices)")
    if type(v) is not int:
        raise InvalidArgument(f"program: {what} must be an enum value")
    try:
        return table[v]
    except Exception:
        raise InvalidArgument(f"program: {what} has unknown value {v}") from None


def _refs(value: Any) -> list[str]:
    if isinstance(value, _Ref):
        return [value.name]
    if isinstance(value, list):
        return [n for x in value for n in _refs(x)]
    return []


def _resolve(value: Any, env: dict[str, Any], device: torch.device) -> Any:
    if isinstance(value, _Ref):
        return env[value.name]
    if value is _DEVICE:
        return device
    if isinstance(value, list):
        return [_resolve(x, env, device) for x in value]
    return value


@dataclass
class _Step:
    """One node: call `fn(*args, **kwargs)` and bind the result to `outputs`."""

    fn: Callable
    label: str
    args: list
    kwargs: dict
    outputs: Any  # None (ignore), a name, or a list of names / None / nested lists for tuple returns
    free: tuple[str, ...] = ()


def _output_binding(outputs: list, what: str, single: bool) -> Any:
    """Names the node's result binds: a name, None, or (for several results) a list of those / lists."""
    def one(o: Any) -> Any:
        kind, v = _one(o, what)
        if kind == "as_none":
            return None
        if kind == "as_tensor":
            return _tensor_name(v, what)
        if kind == "as_tensors":
            return [_tensor_name(t, what) for t in _list(v, what)]
        if kind in ("as_sym_int", "as_sym_float", "as_sym_bool"):
            k, n = _one(v, what)
            if k != "as_name":
                raise InvalidArgument(f"program: {what} output must be named")
            return _name(n, what)
        raise InvalidArgument(f"program: {what} has unsupported output kind {kind[:60]!r}")

    if not outputs:
        return None
    if single and len(outputs) == 1:
        return one(outputs[0])
    return [one(o) for o in outputs]


def _bound_names(binding: Any) -> list[str]:
    if binding is None:
        return []
    if isinstance(binding, str):
        return [binding]
    return [n for b in binding for n in _bound_names(b)]


def _bind(binding: Any, value: Any, env: dict[str, Any], label: str) -> None:
    if binding is None:
        return
    if isinstance(binding, str):
        env[binding] = value
        return
    if not isinstance(value, (tuple, list)) or len(value) != len(binding):
        raise InvalidArgument(f"program: {label} returned {type(value).__name__} where the program expects "
                              f"{len(binding)} results")
    for b, v in zip(binding, value):
        _bind(b, v, env, label)


def _compile_node(node: Any, index: int) -> _Step:
    if not isinstance(node, dict):
        raise InvalidArgument(f"program: node {index} must be an object")
    target = node.get("target")
    inputs = _list(node.get("inputs"), f"node {index} inputs")
    outputs = _list(node.get("outputs"), f"node {index} outputs")
    what = f"node {index} ({str(target)[:80]})"
    if isinstance(target, str) and target in SYM_FUNCTIONS:
        args = []
        for inp in inputs:
            if not isinstance(inp, dict) or "arg" not in inp:
                raise InvalidArgument(f"program: {what} has a malformed input")
            args.append(_argument(inp["arg"], what))
        if len(outputs) != 1:
            raise InvalidArgument(f"program: {what} must have one output")
        return _Step(SYM_FUNCTIONS[target], target, args, {}, _output_binding(outputs, what, True))
    op = aten_operator(target)
    schema = op._schema
    by_name = {a.name: a for a in schema.arguments}
    given: dict[str, Any] = {}
    for inp in inputs:
        if not isinstance(inp, dict) or "arg" not in inp or not isinstance(inp.get("name"), str):
            raise InvalidArgument(f"program: {what} has a malformed input")
        if inp["name"] not in by_name:
            raise InvalidArgument(f"program: {what} has no argument {inp['name'][:80]!r}")
        if inp["name"] in given:
            raise InvalidArgument(f"program: {what} gives {inp['name'][:80]!r} twice")
        given[inp["name"]] = _argument(inp["arg"], f"{what} argument {inp['name']!r}")
    missing = [a.name for a in schema.arguments if a.name not in given and not a.has_default_value()]
    if missing:
        raise InvalidArgument(f"program: {what} lacks required argument(s) {', '.join(missing)}")
    args, kwargs, gap = [], {}, False
    for a in schema.arguments:
        if a.name not in given:
            gap = True
            continue
        if gap or a.kwarg_only:
            kwargs[a.name] = given[a.name]
        else:
            args.append(given[a.name])
    single = len(schema.returns) == 1
    if len(schema.returns) > 1 and len(outputs) != len(schema.returns):
        raise InvalidArgument(f"program: {what} names {len(outputs)} outputs; the operator returns "
                              f"{len(schema.returns)}")
    fn: Callable = op
    if str(op) == "aten._assert_tensor_metadata.default":
        # It checks the exporting dtype and device; the server picks its own device and precision.
        fn = _skip
    return _Step(fn, f"aten.{target.split('.', 3)[3]}", args, kwargs, _output_binding(outputs, what, single))


def _skip(*_args: Any, **_kwargs: Any) -> None:
    return None


@dataclass
class _Program:
    """The validated graph: where its inputs come from, its steps, and its two outputs."""

    parameters: dict[str, str]  # placeholder -> program FQN (parameter)
    buffers: dict[str, tuple[str, bool]]  # placeholder -> (program FQN, persistent)
    constants: dict[str, str]  # placeholder -> lifted tensor constant name
    user_input: str
    steps: list[_Step]
    outputs: tuple[str, str]


def _signature(graph: dict, signature: dict) -> tuple[dict, dict, dict, str, tuple[str, str]]:
    inputs = _list(graph.get("inputs"), "graph inputs")
    specs = _list(signature.get("input_specs"), "signature input_specs")
    if len(inputs) != len(specs):
        raise InvalidArgument("program: graph inputs and signature input specs differ in number")
    params, buffers, constants, users = {}, {}, {}, []
    for i, (inp, spec) in enumerate(zip(inputs, specs)):
        kind, v = _one(inp, f"graph input {i}")
        if kind != "as_tensor":
            raise InvalidArgument(f"program: graph input {i} is a {kind[:60]!r}; only tensor inputs are supported")
        name = _tensor_name(v, f"graph input {i}")
        skind, s = _one(spec, f"input spec {i}")
        if not isinstance(s, dict):
            raise InvalidArgument(f"program: input spec {i} must be an object")
        if skind == "user_input":
            k, a = _one(s.get("arg"), f"input spec {i}")
            if k != "as_tensor" or _tensor_name(a, f"input spec {i}") != name:
                raise InvalidArgument(f"program: input spec {i} does not match graph input {name!r}")
            users.append(name)
            continue
        if skind not in ("parameter", "buffer", "tensor_constant"):
            raise InvalidArgument(f"program: input {name[:80]!r} is a {skind[:60]!r}; only parameters, buffers, "
                                  "tensor constants and one input tensor are supported (no custom objects or tokens)")
        if _tensor_name(s.get("arg"), f"input spec {i}") != name:
            raise InvalidArgument(f"program: input spec {i} does not match graph input {name[:80]!r}")
        if skind == "parameter":
            params[name] = _name(s.get("parameter_name"), f"input spec {i}")
        elif skind == "buffer":
            buffers[name] = (_name(s.get("buffer_name"), f"input spec {i}"), _bool(s.get("persistent", True),
                                                                                  f"input spec {i} persistent"))
        else:
            constants[name] = _name(s.get("tensor_constant_name"), f"input spec {i}")
    if len(users) != 1:
        raise InvalidArgument(f"program: the model must take exactly one input tensor; it takes {len(users)}")
    outs = _list(graph.get("outputs"), "graph outputs")
    ospecs = _list(signature.get("output_specs"), "signature output_specs")
    if len(outs) != 2 or len(ospecs) != 2:
        raise InvalidArgument("program: the graph must return (features, logits) and nothing else "
                              "(no buffer or input mutations); export with export_model")
    names = []
    for i, (o, spec) in enumerate(zip(outs, ospecs)):
        kind, v = _one(o, f"graph output {i}")
        skind, s = _one(spec, f"output spec {i}")
        if kind != "as_tensor" or skind != "user_output" or not isinstance(s, dict):
            raise InvalidArgument(f"program: output {i} must be a user output tensor, not {skind[:60]!r}")
        k, a = _one(s.get("arg"), f"output spec {i}")
        name = _tensor_name(v, f"graph output {i}")
        if k != "as_tensor" or _tensor_name(a, f"output spec {i}") != name:
            raise InvalidArgument(f"program: output spec {i} does not match graph output {name[:80]!r}")
        names.append(name)
    return params, buffers, constants, users[0], (names[0], names[1])


def parse_program(program: Any) -> _Program:
    """Validate torch's exported-program JSON (already parsed) and compile it to interpreter steps."""
    from torch._export.serde.schema import SCHEMA_VERSION

    if not isinstance(program, dict):
        raise InvalidArgument("program.json must hold an object")
    version = program.get("schema_version")
    if not (isinstance(version, dict) and type(version.get("major")) is int and type(version.get("minor")) is int):
        raise InvalidArgument("program.json has no schema_version")
    if version["major"] != SCHEMA_VERSION[0]:
        raise InvalidArgument(
            f"the program was written with torch.export schema {version['major']}.{version['minor']} and this "
            f"server reads schema {SCHEMA_VERSION[0]}.x (torch {torch.__version__}); export it with a torch whose "
            f"schema major version is {SCHEMA_VERSION[0]}, or run a server with the exporting torch version")
    gm = program.get("graph_module")
    if not isinstance(gm, dict) or not isinstance(gm.get("graph"), dict) or not isinstance(gm.get("signature"), dict):
        raise InvalidArgument("program.json has no graph_module.graph / graph_module.signature")
    graph = gm["graph"]
    if graph.get("custom_obj_values"):
        raise InvalidArgument("program: custom (torchbind) objects are not supported")
    params, buffers, constants, user, outputs = _signature(graph, gm["signature"])
    nodes = _list(graph.get("nodes"), "graph nodes")
    if len(nodes) > MAX_NODES:
        raise InvalidArgument(f"program: {len(nodes)} nodes, over the limit of {MAX_NODES}")
    defined = set(params) | set(buffers) | set(constants) | {user}
    if len(defined) != len(params) + len(buffers) + len(constants) + 1:
        raise InvalidArgument("program: graph inputs have duplicate names")
    steps = []
    for i, node in enumerate(nodes):
        step = _compile_node(node, i)
        for n in _refs(step.args) + _refs(list(step.kwargs.values())):
            if n not in defined:
                raise InvalidArgument(f"program: node {i} ({step.label}) uses {n[:80]!r} before it is defined")
        for n in _bound_names(step.outputs):
            if n in defined:
                raise InvalidArgument(f"program: node {i} ({step.label}) redefines {n[:80]!r}")
            defined.add(n)
        steps.append(step)
    for n in outputs:
        if n not in defined:
            raise InvalidArgument(f"program: the output {n[:80]!r} is never computed")
    # Free each intermediate after its last use, as eager code would.
    last: dict[str, int] = {}
    for i, step in enumerate(steps):
        for n in _refs(step.args) + _refs(list(step.kwargs.values())):
            last[n] = i
    frees: dict[int, list[str]] = {}
    for n, i in last.items():
        if n not in outputs:
            frees.setdefault(i, []).append(n)
    for i, step in enumerate(steps):
        step.free = tuple(frees.get(i, ()))
    return _Program(params, buffers, constants, user, steps, outputs)


def _run(program: _Program, env: dict[str, Any], device: torch.device,
         check: Callable[[_Step, Any], None] | None = None) -> tuple[Any, Any]:
    for step in program.steps:
        args = [_resolve(a, env, device) for a in step.args]
        kwargs = {k: _resolve(v, env, device) for k, v in step.kwargs.items()}
        value = step.fn(*args, **kwargs)
        _bind(step.outputs, value, env, step.label)
        if check is not None:
            check(step, value)
        for n in step.free:
            env.pop(n, None)
    return env[program.outputs[0]], env[program.outputs[1]]


# -- the manifest ------------------------------------------------------------------------------

@dataclass
class _Entry:
    key: str  # the original module's state-dict key
    kind: str  # "parameter" or "buffer"
    persistent: bool
    requires_grad: bool


def _parse_manifest(m: Any) -> dict[str, Any]:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise InvalidArgument(f"manifest.json is not a {FORMAT} manifest")
    if m.get("version") != FORMAT_VERSION:
        raise InvalidArgument(f"the archive has format version {str(m.get('version'))[:20]}; this server reads "
                              f"version {FORMAT_VERSION}: export it again with this version of dataselect")
    last = m.get("last_layer")
    if not isinstance(last, str) or not _KEY.match(last):
        raise InvalidArgument("manifest: last_layer must be a dotted module name")
    shape = m.get("input_shape")
    if not isinstance(shape, list) or not shape or len(shape) > 8 or not all(
            type(d) is int and 0 < d < 1 << 31 for d in shape):
        raise InvalidArgument("manifest: input_shape must be a list of positive sizes")
    for k in ("num_classes", "feature_dim"):
        if type(m.get(k)) is not int or not 0 < m[k] < 1 << 31:
            raise InvalidArgument(f"manifest: {k} must be a positive integer")
    name = m.get("input_dtype")
    dtype = {str(d).removeprefix("torch."): d for d in TENSOR_DTYPES}.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise InvalidArgument("manifest: input_dtype must name a tensor dtype such as 'float32'")
    tensors = m.get("tensors")
    if not isinstance(tensors, dict) or len(tensors) > MAX_TENSORS:
        raise InvalidArgument("manifest: tensors must map program names to state-dict keys")
    entries: dict[str, _Entry] = {}
    for fqn, e in tensors.items():
        if not isinstance(e, dict) or not isinstance(e.get("key"), str) or not _KEY.match(e["key"]) \
                or len(e["key"]) > MAX_NAME or e.get("kind") not in ("parameter", "buffer") \
                or type(e.get("persistent")) is not bool or type(e.get("requires_grad")) is not bool:
            raise InvalidArgument(f"manifest: tensor {str(fqn)[:80]!r} must give a dotted key, kind, persistent, "
                                  "requires_grad")
        entries[fqn] = _Entry(e["key"], e["kind"], e["persistent"], e["requires_grad"])
    aliases = m.get("aliases", {})
    if not isinstance(aliases, dict) or not all(
            isinstance(a, str) and len(a) <= MAX_NAME and _KEY.match(a) and isinstance(b, str)
            for a, b in aliases.items()):
        raise InvalidArgument("manifest: aliases must map state-dict keys to state-dict keys")
    return {"last_layer": last, "input_shape": tuple(shape), "num_classes": m["num_classes"],
            "feature_dim": m["feature_dim"], "input_dtype": dtype, "tensors": entries, "aliases": aliases}


# -- the model the server runs -----------------------------------------------------------------

class ExportedModel(nn.Module):
    """An exported program as an `nn.Module`.

    `forward(x)` returns logits `[N, C]`; `features_logits(x)` returns the
    final linear layer's input `[N, D]` and the logits. Parameters and
    buffers sit at the original module's state-dict keys (e.g. "conv1.weight",
    "bn1.running_mean"), so `load_state_dict(user_model.state_dict())` works
    unchanged and `torch.func.functional_call` can swap them. `last_layer` is
    the final linear layer's name in that namespace (read its weights as
    `state_dict()[last_layer + ".weight"]`); `num_classes`, `feature_dim` and
    `input_shape` (per sample) describe the program. The graph was exported
    in eval mode, so train()/eval() change nothing. Build it with
    `load_exported`.
    """

    def __init__(self, program: _Program, manifest: dict[str, Any], state: dict[str, torch.Tensor],
                 constants: dict[str, torch.Tensor]):
        super().__init__()
        self.last_layer: str = manifest["last_layer"]
        self.num_classes: int = manifest["num_classes"]
        self.feature_dim: int = manifest["feature_dim"]
        self.input_shape: tuple[int, ...] = manifest["input_shape"]
        self.input_dtype: torch.dtype = manifest["input_dtype"]
        #: Bytes of the tensors one sample's forward creates (all of them, none freed: what a backward pass
        #: keeps at most), measured on meta tensors at load; module hooks see nothing of the graph's work.
        self.activation_bytes_per_sample: int = 0
        self._program = program
        entries: dict[str, _Entry] = manifest["tensors"]
        aliases: dict[str, str] = manifest["aliases"]
        sources = {**{p: (fqn, "parameter") for p, fqn in program.parameters.items()},
                   **{p: (fqn, "buffer") for p, (fqn, _) in program.buffers.items()}}
        placed: dict[str, tuple[nn.Module, str]] = {}
        keys: dict[str, str] = {}  # placeholder -> state-dict key
        used_state, used_constants = set(), set()
        for placeholder, (fqn, kind) in sources.items():
            e = entries.get(fqn)
            if e is None or e.kind != kind:
                raise InvalidArgument(f"manifest: the program's {kind} {fqn[:80]!r} has no {kind} entry")
            if kind == "buffer" and e.persistent != program.buffers[placeholder][1]:
                raise InvalidArgument(f"manifest: buffer {fqn[:80]!r} persistence differs from the program's")
            if e.key in keys.values():
                raise InvalidArgument(f"manifest: key {e.key!r} is given twice")
            keys[placeholder] = e.key
            if e.key in aliases:  # the same tensor as an earlier key (tied weights)
                placed[e.key] = self._tie(e.key, aliases[e.key], placed)
                continue
            store, used = (state, used_state) if (kind == "parameter" or e.persistent) else (constants, used_constants)
            if e.key not in store:
                raise InvalidArgument(f"archive: tensor {e.key!r} is missing")
            used.add(e.key)
            t = store[e.key]
            value = nn.Parameter(t, requires_grad=e.requires_grad and t.is_floating_point()) \
                if kind == "parameter" else t
            placed[e.key] = self._install(e.key, value, kind, e.persistent)
        for alias, key in aliases.items():  # keys the program does not read
            if alias not in placed:
                placed[alias] = self._tie(alias, key, placed)
        self._reads: list[tuple[str, nn.Module, str]] = [(p, *placed[k]) for p, k in keys.items()]
        for i, (placeholder, name) in enumerate(sorted(program.constants.items())):
            if name not in constants:
                raise InvalidArgument(f"archive: tensor constant {name[:80]!r} is missing")
            used_constants.add(name)
            attr = f"_program_constant_{i}"
            self.register_buffer(attr, constants[name], persistent=False)
            self._reads.append((placeholder, self, attr))
        extra = (set(state) - used_state) | (set(constants) - used_constants)
        if extra:
            raise InvalidArgument(f"archive: tensors the program does not use: {', '.join(sorted(extra)[:5])}")
        weight = placed.get(f"{self.last_layer}.weight")
        if weight is None or weight[1] not in weight[0]._parameters:
            raise InvalidArgument(f"manifest: last_layer {self.last_layer!r} has no weight parameter")
        w = getattr(*weight)
        if tuple(w.shape) != (self.num_classes, self.feature_dim):
            raise InvalidArgument(f"manifest: {self.last_layer}.weight is {list(w.shape)}, not "
                                  f"[num_classes, feature_dim] = [{self.num_classes}, {self.feature_dim}]")
        layer, _ = weight
        bias = placed.get(f"{self.last_layer}.bias")
        if bias is None:
            if hasattr(layer, "bias"):
                raise InvalidArgument(f"manifest: {self.last_layer}.bias is not a tensor")
            layer.register_parameter("bias", None)  # as nn.Linear(bias=False) has it
        elif bias[1] not in layer._parameters or tuple(getattr(*bias).shape) != (self.num_classes,):
            raise InvalidArgument(f"manifest: {self.last_layer}.bias must be a [num_classes] parameter")

    def _tie(self, alias: str, key: str, placed: dict[str, tuple[nn.Module, str]]) -> tuple[nn.Module, str]:
        """Tied tensors stay tied: the object placed at `key` is placed at `alias` too."""
        if key not in placed or alias in placed:
            raise InvalidArgument(f"manifest: alias {alias!r} must name another key for an earlier tensor")
        owner, attr = placed[key]
        is_parameter = attr in owner._parameters
        return self._install(alias, getattr(owner, attr), "parameter" if is_parameter else "buffer",
                             is_parameter or attr not in owner._non_persistent_buffers_set)

    def _install(self, key: str, value: torch.Tensor, kind: str, persistent: bool) -> tuple[nn.Module, str]:
        *path, leaf = key.split(".")
        owner: nn.Module = self
        for part in path:
            child = owner._modules.get(part)
            if child is None:
                if hasattr(owner, part):
                    raise InvalidArgument(f"state-dict key {key!r}: {part!r} clashes with an attribute of "
                                          f"{type(owner).__name__}; rename that submodule")
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        if leaf in owner._parameters or leaf in owner._buffers or leaf in owner._modules or hasattr(owner, leaf):
            raise InvalidArgument(f"state-dict key {key!r} is given twice or clashes with an attribute")
        if kind == "parameter":
            owner.register_parameter(leaf, value)
        else:
            owner.register_buffer(leaf, value, persistent=persistent)
        return owner, leaf

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != len(self.input_shape) + 1 \
                or tuple(x.shape[1:]) != self.input_shape:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InvalidArgument(f"the exported model takes inputs [N, {', '.join(map(str, self.input_shape))}], "
                                  f"got {got}")

    @property
    def final_layer(self) -> nn.Module:
        """The module at `last_layer`: `.weight` `[C, D]` and `.bias` `[C]` (or None), like the nn.Linear it was."""
        return self.get_submodule(self.last_layer)

    def features_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The final linear layer's input `[N, D]` and the logits `[N, C]`."""
        self._check_input(x)
        env: dict[str, Any] = {p: getattr(owner, attr) for p, owner, attr in self._reads}
        env[self._program.user_input] = x
        return _run(self._program, env, x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_logits(x)[1]

    def extra_repr(self) -> str:
        return (f"input_shape={self.input_shape}, num_classes={self.num_classes}, "
                f"feature_dim={self.feature_dim}, last_layer={self.last_layer!r}")


def _dry_run(model: ExportedModel) -> None:
    """Run the graph on meta tensors: check every call, the output shapes and the size of each intermediate."""
    batch = 2
    limit = MAX_ACTIVATION_BYTES_PER_SAMPLE * batch
    device = torch.device("meta")
    env: dict[str, Any] = {}
    for p, owner, attr in model._reads:
        t = getattr(owner, attr)
        env[p] = torch.empty(t.shape, dtype=t.dtype, device=device)
    env[model._program.user_input] = torch.empty((batch, *model.input_shape), dtype=model.input_dtype, device=device)

    produced = 0

    def check(step: _Step, value: Any) -> None:
        nonlocal produced
        # Views (outputs aliasing an input) take no new memory.
        fresh = not (isinstance(step.fn, torch._ops.OpOverload)
                     and any(r.alias_info is not None for r in step.fn._schema.returns))
        for t in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(t, torch.Tensor):
                size = t.numel() * t.element_size()
                if size > limit:
                    raise InvalidArgument(f"program: {step.label} produces a {list(t.shape)} tensor, more than "
                                          f"{MAX_ACTIVATION_BYTES_PER_SAMPLE} bytes per sample")
                produced += size if fresh else 0

    try:
        with torch.no_grad():
            features, logits = _run(model._program, env, device, check)
    except InvalidArgument:
        raise
    except Exception as e:
        raise InvalidArgument(f"the program does not run ({first_line(e)})") from None
    model.activation_bytes_per_sample = max(1, -(-produced // batch))
    want_f, want_z = (batch, model.feature_dim), (batch, model.num_classes)
    if not isinstance(features, torch.Tensor) or not isinstance(logits, torch.Tensor) \
            or tuple(features.shape) != want_f or tuple(logits.shape) != want_z:
        got = [list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in (features, logits)]
        raise InvalidArgument(f"the program returns {got}; the manifest promises features {list(want_f)} and "
                              f"logits {list(want_z)}")


def load_exported(data: bytes, *, max_bytes: int = 2 * 2**30) -> ExportedModel:
    """Rebuild a model from an `export_model` archive without running anything it names.

    Tensors are unpickled only with `weights_only=True`; the graph may call
    only allowlisted core ATen operators and size arithmetic (see the module
    docstring for the full argument). Anything else is an `InvalidArgument`
    saying what was refused.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"an exported model is bytes, not {type(data).__name__}")
    if len(data) > max_bytes:
        raise InvalidArgument(f"the exported model is {len(data)} bytes, over the limit of {max_bytes}; "
                              "raise max_bytes= if the model really is that big")
    data = bytes(data)
    try:
        entries = _stored_entries(data, "the exported model", ENTRIES, {
            "manifest.json": MAX_MANIFEST_BYTES, "program.json": MAX_PROGRAM_BYTES})
        manifest = _parse_manifest(_json(entries["manifest.json"], "manifest.json"))
        program = parse_program(_json(entries["program.json"], "program.json"))
        state = _load_tensors(entries["state_dict.pt"], "state_dict.pt")
        constants = _load_tensors(entries["constants.pt"], "constants.pt")
        model = ExportedModel(program, manifest, state, constants)
        _dry_run(model)
    except InvalidArgument:
        raise
    except Exception as e:  # anything unforeseen is still a bad archive, not a server fault
        raise InvalidArgument(f"the exported model could not be read ({first_line(e)})") from None
    return model.eval()


# -- export (trainer side) ---------------------------------------------------------------------

class _FeaturesLogits(nn.Module):
    """The user's model, returning (input of its final linear layer, its output)."""

    def __init__(self, model: nn.Module, layer: nn.Linear):
        super().__init__()
        self.model = model
        self._layer = [layer]  # a list, so the layer is not registered twice

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []
        handle = self._layer[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        return seen[-1], logits


def _final_linear(model: nn.Module, x: torch.Tensor, last_layer: str | None) -> tuple[str, nn.Linear]:
    """The last nn.Linear whose output is the model's output (checked with a trial forward)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if last_layer is not None:
        named = dict(model.named_modules()).get(last_layer)
        if not isinstance(named, nn.Linear):
            what = "no module" if named is None else f"a {type(named).__name__}, not an nn.Linear"
            raise InvalidArgument(f"last_layer={last_layer!r}: the model has {what} of that name; its nn.Linear "
                                  f"layers are: {', '.join(n for n, _ in linears) or 'none'}")
        linears = [(last_layer, named)]
    seen: dict[str, list] = {n: [] for n, _ in linears}
    handles = [m.register_forward_hook(lambda _m, args, out, n=n: seen[n].append((args[0], out)))
               for n, m in linears]
    try:
        with torch.no_grad():
            z = model(x)
    except Exception as e:
        raise InvalidArgument(f"the model fails on the example input {list(x.shape)} ({first_line(e)})") from None
    finally:
        for h in handles:
            h.remove()
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != x.shape[0]:
        got = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise InvalidArgument(f"the model must return logits [N, C] for an input of N samples; it returned {got}")
    for name, layer in reversed(linears):
        calls = seen[name]
        if calls and calls[-1][1].shape == z.shape and torch.equal(calls[-1][1], z):
            if len(calls) != 1 or calls[0][0].dim() != 2:
                raise InvalidArgument(f"the final nn.Linear {name!r} must be called once per forward on [N, D] "
                                      f"features; name another layer with last_layer=")
            return name, layer
    if last_layer is not None:
        raise InvalidArgument(f"last_layer={last_layer!r}: its output is not the model's output (something runs "
                              "after it); name the nn.Linear that produces the logits with last_layer=")
    raise InvalidArgument(f"no nn.Linear of {type(model).__name__} produces its output (layers: "
                          f"{', '.join(n for n, _ in linears) or 'none'}); the exported model needs its final linear "
                          "layer: name it with last_layer=, or make the model end in an nn.Linear")


def _program_json(ep: Any) -> dict:
    from torch._export.serde.serialize import serialize

    try:  # newer torch can leave out the tensors, which the archive stores itself
        artifact = serialize(ep, serialize_state_dict=False, serialize_constants=False,
                             serialize_example_inputs=False)
    except TypeError:
        artifact = serialize(ep)
    program = json.loads(artifact.exported_program)
    # Node metadata holds stack traces (file paths of the trainer's machine) and is never read.
    for node in program["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {}
    return program


def export_model(model: nn.Module, example_inputs: torch.Tensor, *, last_layer: str | None = None) -> bytes:
    """The model as a program archive (bytes) the server can load with `load_exported`.

    The model is exported in eval mode (its mode is restored afterwards) as a
    program returning (features, logits): features are the input of the
    final `nn.Linear` (the last one whose output is the model's output, or
    the one named by `last_layer`), logits the model's output `[N, C]`. The
    batch dimension is dynamic; the other input dimensions are fixed by
    `example_inputs` (a batch `[N, ...]`). The program is lowered to core
    ATen operators, read back with `load_exported` and checked against the
    model on the example, so an archive this returns is one the server
    accepts.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgument(f"export_model takes an nn.Module, not {type(model).__name__}")
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 2 or example_inputs.shape[0] < 1:
        raise InvalidArgument("example_inputs must be a batch tensor [N, ...] with N >= 1")
    if example_inputs.dtype not in TENSOR_DTYPES:
        raise InvalidArgument(f"example_inputs has dtype {example_inputs.dtype}, which the archive cannot describe")
    x = example_inputs.detach()
    if x.shape[0] < 2:  # a batch of one would be specialised to size 1
        x = torch.cat([x, x])
    was_training = model.training
    model.eval()
    try:
        name, layer = _final_linear(model, x, last_layer)
        wrapper = _FeaturesLogits(model, layer)
        batch = torch.export.Dim("batch", min=1)
        try:
            ep = torch.export.export(wrapper, (x,), dynamic_shapes=({0: batch},), strict=False)
            ep = ep.run_decompositions()
        except Exception as e:
            raise InvalidArgument(
                f"torch.export could not capture {type(model).__name__} ({first_line(e)}). Make its forward "
                "traceable: no Python branches or loops on tensor values (use torch.where or torch.cond), no "
                "data-dependent shapes, no code that specialises on the batch size; or register the model by name "
                "with a plugin instead") from None
        with torch.no_grad():
            want_features, want_logits = wrapper(x)
    finally:
        model.train(was_training)

    prefix = _WRAPPED + "."
    tensors: dict[str, dict] = {}
    state: dict[str, torch.Tensor] = {}
    constants: dict[str, torch.Tensor] = {}
    first_key: dict[int, str] = {}  # id(tensor) -> the first key it appears under
    aliases: dict[str, str] = {}
    for spec in ep.graph_signature.input_specs:
        kind = spec.kind.name
        if kind == "USER_INPUT":
            continue
        if kind in ("CUSTOM_OBJ", "TOKEN"):
            raise InvalidArgument(f"{type(model).__name__} uses custom objects or effects ({spec.target}); they "
                                  "cannot be shipped as data")
        target = spec.target
        if kind == "CONSTANT_TENSOR":
            value = ep.constants[target]
            if not isinstance(value, torch.Tensor):
                raise InvalidArgument(f"the constant {target!r} is a {type(value).__name__}, not a tensor")
            constants[target] = value
            continue
        if not target.startswith(prefix):
            raise InvalidArgument(f"unexpected tensor {target!r} outside the model")
        key = target[len(prefix):]
        persistent = kind == "PARAMETER" or bool(spec.persistent)
        value = ep.state_dict[target] if persistent else ep.constants[target]
        tensors[target] = {"key": key, "kind": "parameter" if kind == "PARAMETER" else "buffer",
                           "persistent": persistent, "requires_grad": bool(value.requires_grad)}
        if id(value) in first_key:
            aliases[key] = first_key[id(value)]
        else:
            first_key[id(value)] = key
            (state if persistent else constants)[key] = value
    # State-dict keys the program does not read are other keys' tensors (tied weights) or not restorable.
    for k, t in model.state_dict(keep_vars=True).items():
        if k not in state and k not in aliases:
            if id(t) not in first_key:
                raise InvalidArgument(f"the model's state-dict key {k!r} is not used by the exported program and "
                                      "is not another key's tensor; it could not be restored on the server")
            aliases[k] = first_key[id(t)]
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "torch_version": torch.__version__,
        "last_layer": name, "num_classes": int(want_logits.shape[1]), "feature_dim": int(want_features.shape[1]),
        "input_shape": list(x.shape[1:]), "input_dtype": str(x.dtype).removeprefix("torch."),
        "tensors": tensors, "aliases": aliases,
    }
    archive = _write_archive({
        "manifest.json": json.dumps(manifest).encode(),
        "program.json": json.dumps(_program_json(ep)).encode(),
        "state_dict.pt": _save_tensors(state),
        "constants.pt": _save_tensors(constants),
    })
    loaded = load_exported(archive, max_bytes=max(len(archive), 1))
    with torch.no_grad():
        got_features, got_logits = loaded.to(x.device).features_logits(x)
    if not (torch.allclose(got_logits.float(), want_logits.float(), rtol=1e-3, atol=1e-4)
            and torch.allclose(got_features.float(), want_features.float(), rtol=1e-3, atol=1e-4)):
        raise InvalidArgument(f"the exported program of {type(model).__name__} does not reproduce the model's "
                              "outputs on the example; register the model by name with a plugin instead")
    return archive
