"""Random malformed requests against one real server: every call gets a status within its deadline,
the server keeps serving, and nothing but a deliberately broken plugin produces INTERNAL."""

from __future__ import annotations

import io
import json

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataselect.checkpoint import make_checkpoint, to_bytes
from dataselect.codec import DTYPES
from dataselect.models import build_model
from dataselect.server import serve
from dataselect.v1 import selection_pb2 as pb
from dataselect.v1 import selection_pb2_grpc as pb_grpc

KWARGS = dict(num_classes=10, in_channels=1, image_size=8)
DEADLINE = 10.0
EXAMPLES = 130  # per test; four tests: > 500 requests in all
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
C = grpc.StatusCode
ALLOWED = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED}
CALLS = {"n": 0}


@pytest.fixture(scope="module")
def server():
    with serve(port=0, max_message_bytes=1 * 2**20, workers=2) as running:
        yield running


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
    return out


def call(fn, request):
    """Every call ends within the deadline with an expected status: never INTERNAL, never a hang."""
    CALLS["n"] += 1
    try:
        fn(request, timeout=DEADLINE)
        code, details = C.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
    assert code != C.DEADLINE_EXCEEDED, "the server hung past the deadline"
    assert code in ALLOWED, f"{code}: {details}"
    if code != C.OK:
        assert details and "Traceback" not in details


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


session_names = st.sampled_from(["ready", "random", "fresh", "", "nope", "x" * 200, "\u00e9\u0000"])


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
                           progress=pb.Progress(epoch=data.draw(st.integers(-3, 3)),
                                                fraction=data.draw(st.floats(allow_nan=True))))
    for field, good in (("ids", ids), ("inputs", inputs), ("labels", labels)):
        choice = data.draw(st.sampled_from(["good", "good", "fuzz", "absent"]))
        if choice == "good":
            getattr(req, field).CopyFrom(good)
        elif choice == "fuzz":
            getattr(req, field).CopyFrom(data.draw(tensors(good)))
    if data.draw(st.booleans()):
        call(stub.Select, req)
    else:
        header = pb.SelectRequest(session_id=req.session_id, budget=req.budget)
        rest = [req] * data.draw(st.integers(0, 3))
        call(stub.SelectStream, iter([header, *rest]))


@FUZZ
@given(data=st.data())
def test_fuzz_open_session(stub, data):
    kwargs = data.draw(st.sampled_from([json.dumps(KWARGS), "", "{", "[]", "null", json.dumps({**KWARGS, "hidden": -3}),
                                        json.dumps({**KWARGS, "in_channels": 0}), json.dumps({"image_size": "big"}),
                                        json.dumps({**KWARGS, "num_classes": 3})]))
    options = data.draw(st.sampled_from(["", "{}", "{", "1", '{"x": 1}', '{"scope": 3}', '{"scope": "full"}'])
                        | st.text(max_size=30))
    from dataselect.plugins import selectors

    strategy = data.draw(st.sampled_from(sorted(selectors()) + ["", "nope"]))
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
        return
    stub.CloseSession(pb.CloseSessionRequest(session_id=resp.session_id), timeout=DEADLINE)


@FUZZ
@given(data=st.data())
def test_fuzz_upload_checkpoint(stub, sessions, data):
    good = sessions["_checkpoint"]
    kind = data.draw(st.sampled_from(["random", "truncated", "flipped", "object", "path"]))
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
    else:
        payload, path = b"", data.draw(st.text(max_size=40))
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


def test_zz_server_still_serving_after_the_fuzz(server, stub, sessions):
    assert CALLS["n"] >= 500, CALLS["n"]
    with grpc.insecure_channel(server.address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    ids, inputs, labels = good_pool(16, 0)
    resp = stub.Select(pb.SelectRequest(session_id=sessions["ready"], ids=ids, inputs=inputs, labels=labels, budget=4),
                       timeout=DEADLINE)
    assert len(resp.selected_ids.shape) == 1
