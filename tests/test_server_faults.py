"""Every bad input of issue 5 against a real server (port 0): the named status, a message saying what
was wrong, and the next valid request on the same server succeeds. Plus load limits, TTL expiry and
memory returning after sessions close."""

from __future__ import annotations

import gc
import io
import json
import pickle
import threading
import time
import weakref
from concurrent import futures

import grpc
import pytest
import torch

from dataselect import codec
from dataselect.checkpoint import make_checkpoint, to_bytes
from dataselect.engine import DEFAULT_MICRO_BATCH
from dataselect.models import build_model
from dataselect.plugins import register_plugin, unregister_plugin
from dataselect.plugins.base import Strategy
from dataselect.plugins.hookspecs import hookimpl
from dataselect.server import serve
from dataselect.v1 import selection_pb2 as pb
from dataselect.v1 import selection_pb2_grpc as pb_grpc

C = grpc.StatusCode
KWARGS = dict(num_classes=10, in_channels=1, image_size=8, mean=(0.5,), std=(0.25,))
MODEL = "mlp"
TIMEOUT = 20
LIMIT = 256 * 1024  # the server's message-size limit in these tests


@pytest.fixture(scope="module")
def server_options():
    return {"max_message_bytes": LIMIT}


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 4 * LIMIT)]) as ch:
        grpc.channel_ready_future(ch).result(timeout=TIMEOUT)
        yield pb_grpc.SelectionStub(ch)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(MODEL, **KWARGS).eval()


def pool(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(n, dtype=torch.int64), torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g))


def open_req(strategy="high_loss", model_name=MODEL, kwargs=None, options="{}", num_classes=10, **kw):
    return pb.OpenSessionRequest(strategy=strategy, options_json=options, num_classes=num_classes,
                                 model=pb.ModelSpec(name=model_name, kwargs_json=json.dumps(kwargs or KWARGS)), **kw)


def chunks_of(session_id, data, version=1, size=4096, **header):
    yield pb.CheckpointChunk(session_id=session_id, version=version, data=data[:size], **header)
    for i in range(size, len(data), size):
        yield pb.CheckpointChunk(data=data[i:i + size])


def req(sid, ids=None, inputs=None, labels=None, budget=4, **kw):
    r = pb.SelectRequest(session_id=sid, budget=budget, **kw)
    for field, t in (("ids", ids), ("inputs", inputs), ("labels", labels)):
        if t is not None:
            getattr(r, field).CopyFrom(t if isinstance(t, pb.Tensor) else codec.encode(t))
    return r


@pytest.fixture(scope="module")
def sid(stub, model):
    sid = stub.OpenSession(open_req(), timeout=TIMEOUT).session_id
    stub.UploadCheckpoint(chunks_of(sid, to_bytes(make_checkpoint(MODEL, KWARGS, model))), timeout=TIMEOUT)
    return sid


def expect(stub, sid, code, fn, *args, contains=(), **kwargs):
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, timeout=TIMEOUT, **kwargs)
    assert err.value.code() == code, err.value.details()
    details = err.value.details()
    for word in contains:
        assert word in details, details
    # The same server still answers a valid request.
    ids, inputs, labels = pool()
    resp = stub.Select(req(sid, ids, inputs, labels, 4), timeout=TIMEOUT)
    assert codec.decode(resp.selected_ids).numel() == 4
    return details


def tensor(dtype, shape, data=None):
    return pb.Tensor(dtype=dtype, shape=list(shape), data=data if data is not None else b"")


# -- tensors and pools -> INVALID_ARGUMENT ------------------------------------------------------

def test_bytes_not_matching_dtype_times_shape(stub, sid):
    ids, inputs, labels = pool()
    bad = codec.encode(inputs)
    bad.data = bad.data[:-1]
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Select, req(sid, ids, bad, labels), contains=("inputs", "do not match"))


def test_unknown_dtype(stub, sid):
    ids, inputs, labels = pool()
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Select, req(sid, ids, tensor("complex64", [16], b"\0" * 128), labels),
           contains=("complex64", "uint8"))


@pytest.mark.parametrize("shape", [[16, 64], [16, 1, 8, 8, 1], [16, 3, 8, 8], [16, 1, 9, 9]])
def test_inputs_of_the_wrong_shape_for_the_model(stub, sid, shape):
    ids, _, labels = pool()
    x = torch.zeros(shape, dtype=torch.uint8)
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Select, req(sid, ids, x, labels), contains=("shape", "[N, 1, 8, 8]"))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_are_rejected(stub, sid, value):
    ids, _, labels = pool()
    x = torch.rand(16, 1, 8, 8)
    x[3, 0, 2, 2] = value
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Select, req(sid, ids, x, labels), contains=("NaN or Inf",))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_other_float_inputs_are_scored(stub, sid, dtype):
    ids, _, labels = pool()
    resp = stub.Select(req(sid, ids, torch.rand(16, 1, 8, 8).to(dtype), labels, 3), timeout=TIMEOUT)
    assert codec.decode(resp.selected_ids).numel() == 3


def test_integer_inputs_other_than_uint8_are_rejected(stub, sid):
    ids, _, labels = pool()
    x = torch.zeros(16, 1, 8, 8, dtype=torch.int32)
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Select, req(sid, ids, x, labels), contains=("uint8",))


@pytest.mark.parametrize("bad", [-1, 10])
def test_labels_out_of_range(stub, sid, bad):
    ids, inputs, labels = pool()
    labels = labels.clone()
    labels[5] = bad
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Select, req(sid, ids, inputs, labels), contains=("[0, 10)",))


def test_ids_and_inputs_of_different_lengths(stub, sid):
    ids, inputs, labels = pool()
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Select, req(sid, ids, inputs[:10], labels), contains=("differ in length",))
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Select, req(sid, ids[:10], inputs[:10], labels), contains=("differ in length",))


def test_duplicate_ids(stub, sid):
    ids, inputs, labels = pool()
    ids = ids.clone()
    ids[7] = ids[2]
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Select, req(sid, ids, inputs, labels), contains=("duplicate ids",))


def test_wrong_id_dtype_and_rank(stub, sid):
    ids, inputs, labels = pool()
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Select, req(sid, ids.int(), inputs, labels), contains=("int64",))
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Select, req(sid, tensor("int64", [1] * 20, b"\0" * 8), inputs, labels),
           contains=("dimensions",))


def test_empty_pool(stub, sid):
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Select, req(sid), contains=("empty",))
    e = torch.empty(0, dtype=torch.int64)
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Select,
           req(sid, e, torch.empty(0, 1, 8, 8, dtype=torch.uint8), e), contains=("empty pool",))


@pytest.mark.parametrize("budget", [0, -3, 17, 2**62])
def test_budget_out_of_range_is_rejected_not_clamped(stub, sid, budget):
    ids, inputs, labels = pool()
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Select, req(sid, ids, inputs, labels, budget),
           contains=("budget", "[1, pool size 16]", "rejects"))


def test_select_stream_of_another_session(stub, sid):
    ids, inputs, labels = pool()

    def messages():
        yield req(sid, ids[:8], inputs[:8], labels[:8], 4)
        yield req("someone-else", ids[8:], inputs[8:], labels[8:], 0)

    expect(stub, sid, C.INVALID_ARGUMENT, stub.SelectStream, messages(), contains=("session",))


# -- sessions, names and options ----------------------------------------------------------------

def test_unknown_strategy_option_model_and_option_type(stub, sid):
    expect(stub, sid, C.INVALID_ARGUMENT, stub.OpenSession, open_req(strategy="nope"), contains=("high_loss", "random"))
    expect(stub, sid, C.INVALID_ARGUMENT, stub.OpenSession, open_req(model_name="resnet9000"),
           contains=("resnet9000", MODEL, "cnn-small"))
    expect(stub, sid, C.INVALID_ARGUMENT, stub.OpenSession, open_req(strategy="random", options='{"bogus": 1}'),
           contains=("bogus", "known options"))
    options = {n: o for n, o in __import__("dataselect.registry", fromlist=["x"]).strategies().items()
               if n != "random" and o.obj.options}
    name, reg = next(iter(options.items()))
    opt_name, opt = next(iter(reg.obj.options.items()))
    wrong = "not a number" if opt.type in (int, float) else [1, 2]
    expect(stub, sid, C.INVALID_ARGUMENT, stub.OpenSession, open_req(strategy=name, options=json.dumps({opt_name: wrong})),
           contains=(opt_name,))


def test_bad_model_arguments(stub, sid):
    expect(stub, sid, C.INVALID_ARGUMENT, stub.OpenSession, open_req(kwargs={**KWARGS, "wings": 2}), contains=("wings",))
    expect(stub, sid, C.INVALID_ARGUMENT, stub.OpenSession, open_req(num_classes=7), contains=("num_classes",))
    expect(stub, sid, C.INVALID_ARGUMENT, stub.OpenSession, open_req(num_classes=1), contains=("num_classes",))
    expect(stub, sid, C.INVALID_ARGUMENT, stub.OpenSession, open_req(dataset_size=-5), contains=("dataset_size",))
    expect(stub, sid, C.INVALID_ARGUMENT, stub.OpenSession, open_req(policy="lottery"), contains=("lottery",))


def test_unknown_or_closed_session_is_not_found(stub, sid):
    ids, inputs, labels = pool()
    expect(stub, sid, C.NOT_FOUND, stub.Select, req("no-such-session", ids, inputs, labels), contains=("OpenSession",))
    expect(stub, sid, C.NOT_FOUND, stub.Select, req("", ids, inputs, labels), contains=("OpenSession",))
    other = stub.OpenSession(open_req(strategy="random"), timeout=TIMEOUT).session_id
    stub.CloseSession(pb.CloseSessionRequest(session_id=other), timeout=TIMEOUT)
    expect(stub, sid, C.NOT_FOUND, stub.Select, req(other, ids, inputs, labels))
    expect(stub, sid, C.NOT_FOUND, stub.CloseSession, pb.CloseSessionRequest(session_id=other))
    expect(stub, sid, C.NOT_FOUND, stub.Report, pb.ReportRequest(session_id=other))


def test_select_before_any_checkpoint(stub, sid):
    fresh = stub.OpenSession(open_req(), timeout=TIMEOUT).session_id
    ids, inputs, labels = pool()
    expect(stub, sid, C.FAILED_PRECONDITION, stub.Select, req(fresh, ids, inputs, labels), contains=("UploadCheckpoint",))


def test_bad_reports(stub, sid):
    ids = torch.arange(4)
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Report, pb.ReportRequest(session_id=sid, ids=codec.encode(ids)),
           contains=("losses",))
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Report,
           pb.ReportRequest(session_id=sid, ids=codec.encode(ids), losses=codec.encode(torch.rand(3))), contains=("aligned",))
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Report,
           pb.ReportRequest(session_id=sid, ids=codec.encode(ids.float()), losses=codec.encode(torch.rand(4))),
           contains=("integers",))
    nan = torch.tensor([0.1, float("nan"), 0.3, 0.4])
    expect(stub, sid, C.INVALID_ARGUMENT, stub.Report,
           pb.ReportRequest(session_id=sid, ids=codec.encode(ids), losses=codec.encode(nan)), contains=("finite",))


# -- checkpoints ---------------------------------------------------------------------------------

def upload_bytes(stub, sid, data, timeout=TIMEOUT, **header):
    return stub.UploadCheckpoint(chunks_of(sid, data, **header), timeout=timeout)


def test_checkpoint_that_is_not_a_state_dict(stub, sid, model):
    target = stub.OpenSession(open_req(), timeout=TIMEOUT).session_id
    for obj, words in (([1, 2, 3], ("must be a dict",)), ({"state_dict": {"w": 3}}, ("state_dict",)),
                       ({"model": MODEL}, ("state_dict",))):
        buf = io.BytesIO()
        torch.save(obj, buf)
        expect(stub, sid, C.INVALID_ARGUMENT, upload_bytes, stub, target, buf.getvalue(), contains=words)


def test_truncated_checkpoint(stub, sid, model):
    target = stub.OpenSession(open_req(), timeout=TIMEOUT).session_id
    data = to_bytes(make_checkpoint(MODEL, KWARGS, model))
    expect(stub, sid, C.INVALID_ARGUMENT, upload_bytes, stub, target, data[: len(data) // 2], contains=("truncated",))
    # Announced size not reached: also refused, naming both sizes.
    expect(stub, sid, C.INVALID_ARGUMENT, upload_bytes, stub, target, data[:-10], total_bytes=len(data),
           contains=(str(len(data)),))


def test_checkpoint_that_does_not_fit_the_model(stub, sid, model):
    target = stub.OpenSession(open_req(), timeout=TIMEOUT).session_id
    state = {k: v.clone() for k, v in model.state_dict().items()}
    missing = dict(state)
    missing.pop(next(iter(missing)))
    extra = {**state, "surprise.weight": torch.zeros(2)}
    key = next(k for k, v in state.items() if v.dim() == 2)
    shaped = {**state, key: torch.zeros(3, 3)}
    nan = {**state, key: torch.full_like(state[key], float("nan"))}
    for st, word in ((missing, "missing keys"), (extra, "unexpected keys"), (shaped, "shape mismatch"), (nan, "NaN")):
        data = to_bytes({"format": "dataselect.checkpoint/1", "model": MODEL, "kwargs": KWARGS, "state_dict": st})
        expect(stub, sid, C.INVALID_ARGUMENT, upload_bytes, stub, target, data, contains=(word,))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_payload_is_refused_and_never_runs(stub, sid, tmp_path):
    marker = tmp_path / "pwned"
    target = stub.OpenSession(open_req(), timeout=TIMEOUT).session_id
    evil = pickle.dumps({"state_dict": {}, "x": _Payload(marker)})
    buf = io.BytesIO()
    torch.save({"state_dict": {}, "x": _Payload(marker)}, buf)  # the torch.save (zip) flavour too
    assert not marker.exists()
    for data in (evil, buf.getvalue()):
        expect(stub, sid, C.INVALID_ARGUMENT, upload_bytes, stub, target, data, contains=("refused",) if data is evil else ())
    assert not marker.exists(), "the pickle payload ran on the server"


# -- limits --------------------------------------------------------------------------------------

def test_message_over_the_size_limit_names_the_limit(stub, sid):
    n = 5000  # 5000 * 64 bytes of images > 256 KiB
    ids, inputs, labels = pool(n)
    details = expect(stub, sid, C.RESOURCE_EXHAUSTED, stub.Select, req(sid, ids, inputs, labels))
    assert str(LIMIT) in details


def test_remote_scorer_streams_large_pools_and_names_the_limit(server, model):
    from dataselect.client.remote import RemoteScorer
    from dataselect.client.scorer import SessionSpec
    from dataselect.errors import ResourceExhausted
    from dataselect.plugins.base import Progress

    spec = SessionSpec("high_loss", {}, MODEL, dict(KWARGS), num_classes=10)
    ids, inputs, labels = pool(5000)
    with RemoteScorer(server.address, spec, max_message_bytes=LIMIT) as remote:
        remote.push_checkpoint(model, 1, 0)
        assert remote.select(ids, inputs, labels, 10, Progress()).selected_ids.numel() == 10  # streamed in chunks
    # A client that believes in a larger limit than the server's is told the limit.
    with RemoteScorer(server.address, spec, max_message_bytes=4 * LIMIT) as remote:
        remote.push_checkpoint(model, 1, 0)
        with pytest.raises(ResourceExhausted, match=str(LIMIT)):
            remote.select(ids, inputs, labels, 10, Progress())


class _Exploding(Strategy):
    name = "exploding_for_test"
    description = "raises"
    default_mode = "online"
    default_policy = "topk"
    signals = frozenset()

    def score(self, pool):
        raise ZeroDivisionError("kaboom")


class _ExplodingPlugin:
    @hookimpl
    def register_strategies(self, register):
        register(_Exploding)


def test_raising_plugin_is_internal_naming_the_plugin(stub, sid):
    register_plugin(_ExplodingPlugin(), "exploding-plugin")
    try:
        bad = stub.OpenSession(open_req(strategy="exploding_for_test"), timeout=TIMEOUT).session_id
        ids, _, labels = pool()
        details = expect(stub, sid, C.INTERNAL, stub.Select, req(bad, ids, None, labels),
                         contains=("exploding_for_test", "exploding-plugin", "ZeroDivisionError", "kaboom"))
        assert "Traceback" not in details
    finally:
        unregister_plugin("exploding-plugin")


def test_out_of_memory_retries_with_smaller_micro_batches(server, stub, sid, monkeypatch):
    import dataselect.scoring as scoring

    real = scoring.compute_signals
    seen = []

    def tight(model, inputs, labels, wanted, *, device, micro_batch, **engine_options):
        seen.append(micro_batch)
        if micro_batch > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, inputs, labels, wanted, device=device, micro_batch=micro_batch, **engine_options)

    monkeypatch.setattr(scoring, "compute_signals", tight)
    fresh = stub.OpenSession(open_req(), timeout=TIMEOUT).session_id
    stub.UploadCheckpoint(chunks_of(fresh, to_bytes(make_checkpoint(MODEL, KWARGS, build_model(MODEL, **KWARGS)))),
                          timeout=TIMEOUT)
    ids, inputs, labels = pool(16)
    resp = stub.Select(req(fresh, ids, inputs, labels, 4), timeout=TIMEOUT)
    assert codec.decode(resp.selected_ids).numel() == 4
    # The server's default micro-batch is 'auto', which is DEFAULT_MICRO_BATCH on the CPU.
    assert server.servicer.micro_batch == "auto" and seen[0] == DEFAULT_MICRO_BATCH and seen[-1] == 4
    assert seen == sorted(seen, reverse=True) and all(a == 2 * b for a, b in zip(seen, seen[1:]))

    def never(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(scoring, "compute_signals", never)
    monkeypatch.setattr(scoring, "compute_signals", never)
    expect_details = None
    with pytest.raises(grpc.RpcError) as err:
        stub.Select(req(fresh, ids, inputs, labels, 4), timeout=TIMEOUT)
    assert err.value.code() == C.RESOURCE_EXHAUSTED and "out of memory" in err.value.details()
    monkeypatch.setattr(scoring, "compute_signals", real)
    expect_details = stub.Select(req(sid, ids, inputs, labels, 4), timeout=TIMEOUT)
    assert expect_details.selected_ids.shape == [4]


# -- load, expiry and memory ---------------------------------------------------------------------

def test_calls_over_the_queue_limit_are_refused_at_once(model, monkeypatch):
    import dataselect.scoring as scoring

    gate, entered = threading.Event(), threading.Semaphore(0)
    real = scoring.compute_signals

    def blocking(*args, **kwargs):
        entered.release()
        assert gate.wait(TIMEOUT)
        return real(*args, **kwargs)

    with serve(port=0, workers=1, max_queue=1) as running, grpc.insecure_channel(running.address) as ch:
        stub = pb_grpc.SelectionStub(ch)
        sid = stub.OpenSession(open_req(), timeout=TIMEOUT).session_id
        stub.UploadCheckpoint(chunks_of(sid, to_bytes(make_checkpoint(MODEL, KWARGS, model))), timeout=TIMEOUT)
        monkeypatch.setattr(scoring, "compute_signals", blocking)
        ids, inputs, labels = pool()
        first = stub.Select.future(req(sid, ids, inputs, labels, 4), timeout=TIMEOUT)
        assert entered.acquire(timeout=TIMEOUT)  # scoring, holding the one worker
        second = stub.Select.future(req(sid, ids, inputs, labels, 4), timeout=TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while True:  # one call scores, one waits for the worker; the next is one too many
            t0 = time.monotonic()
            try:
                # A short deadline: if this probe reached the queue before `second`
                # did, it waits there (its handler keeps the slot after the client
                # gives up), and the next probe must then be refused.
                stub.Select(req(sid, ids, inputs, labels, 4), timeout=2)
            except grpc.RpcError as exc:
                if exc.code() == C.RESOURCE_EXHAUSTED:
                    assert "--max-queue" in exc.details() and time.monotonic() - t0 < 5
                    break
                if exc.code() != C.DEADLINE_EXCEEDED:
                    raise
            assert time.monotonic() < deadline, "never refused"
        gate.set()
        assert codec.decode(first.result().selected_ids).numel() == 4
        try:  # `second` queued behind `first`, unless a probe took the queue slot before it
            assert second.result().cost.queue_seconds > 0
        except grpc.RpcError as exc:
            assert exc.code() == C.RESOURCE_EXHAUSTED
        assert codec.decode(stub.Select(req(sid, ids, inputs, labels, 4), timeout=TIMEOUT).selected_ids).numel() == 4


def test_idle_sessions_expire_and_memory_returns(model):
    with serve(port=0, session_ttl=0.3) as running, grpc.insecure_channel(running.address) as ch:
        stub = pb_grpc.SelectionStub(ch)
        sid = stub.OpenSession(open_req(strategy="random"), timeout=TIMEOUT).session_id
        ref = weakref.ref(running.store.get(sid).model)
        ids, _, labels = pool()
        deadline = time.monotonic() + TIMEOUT
        while len(running.store) and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as err:
            stub.Select(req(sid, ids, None, labels), timeout=TIMEOUT)
        assert err.value.code() == C.NOT_FOUND and "session-ttl" in err.value.details()
        gc.collect()
        assert ref() is None, "the expired session's model is still referenced"

    with serve(port=0) as running, grpc.insecure_channel(running.address) as ch:
        stub = pb_grpc.SelectionStub(ch)
        refs = []
        for i in range(30):
            sid = stub.OpenSession(open_req(seed=i), timeout=TIMEOUT).session_id
            refs.append(weakref.ref(running.store.get(sid).model))
            stub.UploadCheckpoint(chunks_of(sid, to_bytes(make_checkpoint(MODEL, KWARGS, model))), timeout=TIMEOUT)
            stub.Select(req(sid, *pool(), 4), timeout=TIMEOUT)
            stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=TIMEOUT)
        assert len(running.store) == 0
        gc.collect()
        assert sum(r() is not None for r in refs) == 0, "closed sessions' models are still alive"


def test_sessions_from_many_clients_run_concurrently(server, model):
    def run(i):
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.SelectionStub(ch)
            sid = stub.OpenSession(open_req(seed=i), timeout=TIMEOUT).session_id
            stub.UploadCheckpoint(chunks_of(sid, to_bytes(make_checkpoint(MODEL, KWARGS, model))), timeout=TIMEOUT)
            out = [codec.decode(stub.Select(req(sid, *pool(32, seed=j), 8), timeout=TIMEOUT).selected_ids).tolist()
                   for j in range(5)]
            stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=TIMEOUT)
            return out

    with futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(run, range(8)))
    assert all(r == results[0] for r in results)  # same weights, same pools: same answers
