"""Random malformed requests against one real server: every call gets an expected status within its
deadline (never INTERNAL, never UNKNOWN), and a valid Select on the same server succeeds after every
one of them. Classes covered: malformed tensors and pools, values that overflow later (extreme floats,
progress fields, Report values), sessions and options (deep, non-finite or huge JSON, long names, model
arguments), checkpoints (random, truncated, flipped, compressed, sparse, huge weights, paths that escape,
loop or are too long) and bodies that are not messages at all."""

from __future__ import annotations

import io
import json
import os
import zipfile

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataselect.checkpoint import make_checkpoint, to_bytes
from dataselect.codec import DTYPES
from dataselect.models import build_model
from dataselect.v1 import selection_pb2 as pb
from dataselect.v1 import selection_pb2_grpc as pb_grpc

KWARGS = dict(num_classes=10, in_channels=1, image_size=8)
DEADLINE = 10.0
EXAMPLES = 115  # per test; five fuzz tests: > 500 malformed requests in all
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
C = grpc.StatusCode
ALLOWED = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED}
CALLS = {"n": 0, "malformed": 0, "checked": 0}
#: The stub and a ready session, for the valid Select after every fuzzed call.
STATE: dict = {}


@pytest.fixture(scope="module")
def server_options(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")
    os.symlink("/", root / "escape")
    return {"max_message_bytes": 1 * 2**20, "checkpoint_dir": root, "session_memory": 64 * 2**20}


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as ch:
        grpc.channel_ready_future(ch).result(timeout=DEADLINE)
        yield pb_grpc.SelectionStub(ch)


@pytest.fixture(scope="module")
def sessions(stub):
    """A ready high_loss session, a random one, and one without a checkpoint."""
    torch.manual_seed(0)
    data = to_bytes(make_checkpoint("mlp", KWARGS, build_model("mlp", **KWARGS)))
    out = {}
    for name, strategy in (("ready", "high_loss"), ("random", "random"), ("fresh", "high_loss")):
        out[name] = stub.OpenSession(pb.OpenSessionRequest(
            strategy=strategy, num_classes=10, model=pb.ModelSpec(name="mlp", kwargs_json=json.dumps(KWARGS))),
            timeout=DEADLINE).session_id
    stub.UploadCheckpoint(iter([pb.CheckpointChunk(session_id=out["ready"], version=1, data=data)]), timeout=DEADLINE)
    out["_checkpoint"] = data
    STATE.update(stub=stub, ready=out["ready"])
    return out


def valid_select_succeeds():
    ids, inputs, labels = good_pool(16, CALLS["n"] % 7)
    resp = STATE["stub"].Select(pb.SelectRequest(session_id=STATE["ready"], ids=ids, inputs=inputs, labels=labels,
                                                 budget=4), timeout=DEADLINE)
    assert resp.selected_ids.shape == [4]
    CALLS["checked"] += 1


def call(fn, request):
    """Every call ends within the deadline with an expected status (never INTERNAL or UNKNOWN, never a
    hang, a bounded message), and a valid Select on the same server succeeds right after it."""
    CALLS["n"] += 1
    try:
        fn(request, timeout=DEADLINE)
        code, details = C.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
    assert code != C.DEADLINE_EXCEEDED, "the server hung past the deadline"
    assert code in ALLOWED, f"{code}: {details}"
    if code != C.OK:
        CALLS["malformed"] += 1
        assert details and "Traceback" not in details and len(details.encode()) <= 1024
    valid_select_succeeds()


dtypes = st.sampled_from(list(DTYPES) + ["", "complex64", "float8", "int64 ", "\x00"])
shapes = st.lists(st.integers(-2, 20), max_size=6) | st.lists(st.integers(0, 3), min_size=7, max_size=70)


@st.composite
def tensors(draw, good: pb.Tensor | None = None):
    if good is not None and draw(st.booleans()):
        t = pb.Tensor()
        t.CopyFrom(good)
        mutation = draw(st.sampled_from(["drop", "dtype", "shape", "none"]))
        if mutation == "drop" and t.data:
            t.data = t.data[:draw(st.integers(0, len(t.data) - 1))]
        elif mutation == "dtype":
            t.dtype = draw(dtypes)
        elif mutation == "shape":
            t.shape[:] = draw(shapes)
        return t
    shape = draw(shapes)
    dtype = draw(dtypes)
    if draw(st.booleans()) and dtype in DTYPES and all(s >= 0 for s in shape):
        n = 1
        for s in shape:
            n *= s
        n = min(n, 4096)
        size = n * torch.empty((), dtype=DTYPES[dtype]).element_size()
        data = draw(st.binary(min_size=size, max_size=size)) if size <= 512 else bytes(size)
    else:
        data = draw(st.binary(max_size=300))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def good_pool(n, seed):
    from dataselect import codec

    g = torch.Generator().manual_seed(seed)
    return (codec.encode(torch.arange(n)), codec.encode(torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)),
            codec.encode(torch.randint(0, 10, (n,), generator=g)))


session_names = st.sampled_from(["ready", "random", "fresh", "", "nope", "x" * 200, "\u00e9\u0000", "y" * 100_000])
#: Floats that pass a finiteness check but overflow float32 arithmetic (or are not finite at all).
EXTREME = st.sampled_from([1e300, -1e300, 3e38, -3e38, 1e7, float("nan"), float("inf"), 65504.0, 0.5])


@st.composite
def extreme_inputs(draw, n):
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
    x = torch.rand(n, 1, 8, 8, dtype=torch.float64)
    for _ in range(draw(st.integers(1, 3))):
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(EXTREME)
    from dataselect import codec

    return codec.encode(x.to(dtype))


@FUZZ
@given(data=st.data())
def test_fuzz_select(stub, sessions, data):
    n = data.draw(st.integers(0, 40))
    ids, inputs, labels = good_pool(n, data.draw(st.integers(0, 5)))
    name = data.draw(session_names)
    req = pb.SelectRequest(session_id=sessions.get(name, name),
                           budget=data.draw(st.integers(-5, 50) | st.sampled_from([2**63 - 1, -(2**63)])),
                           return_scores=data.draw(st.booleans()),
                           policy=data.draw(st.sampled_from(["", "topk", "sample", "bogus"])),
                           progress=pb.Progress(epoch=data.draw(st.integers(-3, 3) | st.sampled_from([2**31 - 1])),
                                                total_epochs=data.draw(st.sampled_from([0, 4, 2**31 - 1])),
                                                fraction=data.draw(st.floats(allow_nan=True))))
    for field, good in (("ids", ids), ("inputs", inputs), ("labels", labels)):
        choice = data.draw(st.sampled_from(["good", "good", "fuzz", "absent", "extreme", "huge-empty"]))
        if choice == "good" or (choice == "extreme" and (field != "inputs" or n == 0)):
            getattr(req, field).CopyFrom(good)
        elif choice == "fuzz":
            getattr(req, field).CopyFrom(data.draw(tensors(good)))
        elif choice == "extreme":
            getattr(req, field).CopyFrom(data.draw(extreme_inputs(n)))
        elif choice == "huge-empty":
            getattr(req, field).CopyFrom(pb.Tensor(dtype="uint8", shape=[0, 2**62, 2**62]))
    if data.draw(st.booleans()):
        call(stub.Select, req)
    else:
        header = pb.SelectRequest(session_id=req.session_id, budget=req.budget)
        rest = [req] * data.draw(st.integers(0, 3))
        call(stub.SelectStream, iter([header, *rest]))


@FUZZ
@given(data=st.data())
def test_fuzz_open_session(stub, data):
    deep = '{"a": ' + "[" * 5000 + "]" * 5000 + "}"
    kwargs = data.draw(st.sampled_from([json.dumps(KWARGS), "", "{", "[]", "null", json.dumps({**KWARGS, "hidden": -3}),
                                        json.dumps({**KWARGS, "in_channels": 0}), json.dumps({"image_size": "big"}),
                                        json.dumps({**KWARGS, "num_classes": 3}), json.dumps({**KWARGS, "std": [0]}),
                                        json.dumps({**KWARGS, "std": [-2]}), json.dumps({**KWARGS, "mean": [1e300]}),
                                        '{"std": [NaN]}', json.dumps({**KWARGS, "hidden": 10**6}),
                                        json.dumps({**KWARGS, "image_size": 10**6}), deep, '{"x": ' + "7" * 6000 + "}"]))
    options = data.draw(st.sampled_from(["", "{}", "{", "1", '{"x": 1}', '{"scope": 3}', '{"scope": "full"}', deep,
                                         '{"beta": NaN}', '{"beta": Infinity}', '{"warmup_epochs": 1000000000000}',
                                         '{"schedule": "power"}', "x" * 70_000])
                        | st.text(max_size=30))
    from dataselect.registry import strategies

    strategy = data.draw(st.sampled_from(sorted(strategies()) + ["", "nope", "s" * 300_000]))
    req = pb.OpenSessionRequest(strategy=strategy, options_json=options,
                                model=pb.ModelSpec(name=data.draw(st.sampled_from(["mlp", "cnn-small", "", "nope"])),
                                                   kwargs_json=kwargs),
                                seed=data.draw(st.integers(0, 2**64 - 1)),
                                num_classes=data.draw(st.integers(-3, 12)),
                                dataset_size=data.draw(st.integers(-10, 10_000)),
                                policy=data.draw(st.sampled_from(["", "topk", "sample", "bogus"])))
    CALLS["n"] += 1
    try:
        resp = stub.OpenSession(req, timeout=DEADLINE)
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, f"{exc.code()}: {exc.details()}"
        assert len(exc.details().encode()) <= 1024
        CALLS["malformed"] += 1
        valid_select_succeeds()
        return
    if strategy == "mrmc":  # an option accepted at open must not fail later
        call(stub.Report, pb.ReportRequest(session_id=resp.session_id, ids=good_pool(4, 0)[0],
                                           losses=codec_encode(torch.rand(4))))
    stub.CloseSession(pb.CloseSessionRequest(session_id=resp.session_id), timeout=DEADLINE)
    valid_select_succeeds()


def codec_encode(t):
    from dataselect import codec

    return codec.encode(t)


@FUZZ
@given(data=st.data())
def test_fuzz_upload_checkpoint(stub, sessions, data):
    good = sessions["_checkpoint"]
    kind = data.draw(st.sampled_from(["random", "truncated", "flipped", "object", "path", "compressed", "tensors"]))
    path = ""
    if kind == "random":
        payload = data.draw(st.binary(max_size=2000))
    elif kind == "truncated":
        payload = good[:data.draw(st.integers(0, len(good) - 1))]
    elif kind == "flipped":
        at = data.draw(st.integers(0, len(good) - 1))
        payload = good[:at] + bytes([good[at] ^ 0xFF]) + good[at + 1:]
    elif kind == "object":
        buf = io.BytesIO()
        torch.save(data.draw(st.sampled_from([{}, [], 3, {"state_dict": []}, {"state_dict": {1: torch.zeros(2)}},
                                              {"state_dict": {"w": torch.zeros(2)}, "model": 5}])), buf)
        payload = buf.getvalue()
    elif kind == "compressed":
        src, out = zipfile.ZipFile(io.BytesIO(good)), io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for info in src.infolist():
                z.writestr(info.filename, src.read(info.filename))
        payload = out.getvalue()
    elif kind == "tensors":
        state = {k: v.clone() for k, v in build_model("mlp", **KWARGS).state_dict().items()}
        key = data.draw(st.sampled_from(sorted(state)))
        change = data.draw(st.sampled_from(["huge", "-huge", "sparse", "complex", "half-huge"]))
        if change == "huge":
            state[key] = torch.full_like(state[key], 3e38)
        elif change == "-huge":
            state[key] = torch.full_like(state[key], -1e30)
        elif change == "half-huge":
            state[key] = torch.full_like(state[key], 6e4).half()
        elif change == "sparse":
            state[key] = state[key].to_sparse()
        else:
            state[key] = state[key].to(torch.complex64)
        payload = to_bytes({"format": "dataselect.checkpoint/1", "model": "mlp", "state_dict": state})
    else:
        payload = b""
        path = data.draw(st.text(max_size=40) | st.sampled_from(["loop-a", "loop-b/x", "escape/etc/passwd", "a" * 300,
                                                                  "b/" * 3000, "../../x"]))
    name = data.draw(st.sampled_from(["fresh", "", "nope"]))
    sid = sessions.get(name, name)
    size = data.draw(st.integers(1, 700) if len(payload) < 4096 else st.integers(512, 70_000))
    chunks = [pb.CheckpointChunk(session_id=sid, version=data.draw(st.integers(-5, 5)), path=path,
                                 total_bytes=data.draw(st.sampled_from([0, len(payload), -1, 2**40])),
                                 data=payload[:size])]
    chunks += [pb.CheckpointChunk(data=payload[i:i + size]) for i in range(size, len(payload), size)]
    call(stub.UploadCheckpoint, iter(chunks))


@FUZZ
@given(data=st.data())
def test_fuzz_report_and_close(stub, sessions, data):
    name = data.draw(session_names)
    sid = sessions.get(name, name)
    if data.draw(st.integers(0, 9)) == 0:
        call(stub.CloseSession, pb.CloseSessionRequest(session_id=data.draw(st.sampled_from(["", "nope", "x" * 99]))))
        return
    req = pb.ReportRequest(session_id=sid)
    for field in ("ids", "losses", "true_class_probs", "correct"):
        if data.draw(st.booleans()):
            getattr(req, field).CopyFrom(data.draw(tensors()))
    call(stub.Report, req)


# -- bodies that are not messages ------------------------------------------------------------------
METHODS = {"Select": "unary", "OpenSession": "unary", "Report": "unary", "CloseSession": "unary", "Describe": "unary",
           "SelectStream": "stream", "UploadCheckpoint": "stream"}


@FUZZ
@given(data=st.data())
def test_fuzz_raw_bodies(server, stub, sessions, data):
    method = data.draw(st.sampled_from(sorted(METHODS)))
    kind = data.draw(st.sampled_from(["random", "truncated", "bad-utf8"]))
    ids, inputs, labels = good_pool(8, 0)
    good = pb.SelectRequest(session_id=sessions["ready"], ids=ids, inputs=inputs, labels=labels, budget=2)
    if kind == "random":
        body = data.draw(st.binary(min_size=1, max_size=200))
    elif kind == "truncated":
        whole = good.SerializeToString()
        body = whole[:data.draw(st.integers(1, len(whole) - 1))]
    else:
        body = b"\x0a\x02" + data.draw(st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0"]))
    with grpc.insecure_channel(server.address) as ch:
        path = f"/dataselect.v1.Selection/{method}"
        if METHODS[method] == "unary":
            call(ch.unary_unary(path), body)
        else:
            first = [] if data.draw(st.booleans()) else [pb.SelectRequest(session_id=sessions["ready"], budget=2)
                                                          .SerializeToString()]
            call(ch.stream_unary(path), iter(first + [body]))


def test_zz_server_still_serving_after_the_fuzz(server, stub, sessions):
    assert CALLS["malformed"] >= 500, CALLS
    assert CALLS["checked"] >= CALLS["n"], CALLS
    with grpc.insecure_channel(server.address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    ids, inputs, labels = good_pool(16, 0)
    resp = stub.Select(pb.SelectRequest(session_id=sessions["ready"], ids=ids, inputs=inputs, labels=labels, budget=4),
                       timeout=DEADLINE)
    assert len(resp.selected_ids.shape) == 1
