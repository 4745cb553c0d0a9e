"""The gRPC scoring server against a real in-process server on a free port."""

from __future__ import annotations

import json

import grpc
import pytest
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dataselect import codec
from dataselect.checkpoint import make_checkpoint, to_bytes
from dataselect.client.remote import RemoteScorer, ServerUnavailable
from dataselect.client.scorer import EmbeddedScorer, SessionSpec
from dataselect.errors import FailedPrecondition, InvalidArgument, NotFound
from dataselect.models import build_model
from dataselect.plugins.base import Progress
from dataselect.server import AddressInUse, serve
from dataselect.v1 import selection_pb2 as pb
from dataselect.v1 import selection_pb2_grpc as pb_grpc
from pools import random_pool

KWARGS = dict(num_classes=10, in_channels=1, image_size=28, mean=(0.1307,), std=(0.3081,))
MODEL = "mlp"
TIMEOUT = 20


@pytest.fixture(scope="module")
def server_options():
    return {"max_message_bytes": 8 * 2**20, "workers": 4}


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        grpc.channel_ready_future(ch).result(timeout=TIMEOUT)
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.SelectionStub(channel)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(MODEL, **KWARGS).eval()


def make_pool(n: int, seed: int = 1, start_id: int = 1000):
    return random_pool(n, seed, start_id=start_id)


def open_session(stub, strategy="high_loss", seed=0, model_name=MODEL, kwargs=KWARGS, options="{}"):
    return stub.OpenSession(pb.OpenSessionRequest(
        strategy=strategy, options_json=options, model=pb.ModelSpec(name=model_name, kwargs_json=json.dumps(kwargs)),
        seed=seed, num_classes=10, dataset="test", dataset_size=10_000,
    ), timeout=TIMEOUT)


def upload(stub, session_id, model, version=1, chunk=1000, model_name=MODEL, kwargs=KWARGS):
    data = to_bytes(make_checkpoint(model_name, kwargs, model, version=version))
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    assert len(pieces) > 3, "the test must really exercise a multi-chunk upload"

    def chunks():
        yield pb.CheckpointChunk(session_id=session_id, version=version, total_bytes=len(data), data=pieces[0])
        for p in pieces[1:]:
            yield pb.CheckpointChunk(data=p)

    return stub.UploadCheckpoint(chunks(), timeout=TIMEOUT), len(data)


def select_request(session_id, ids, inputs, labels, budget, **kw):
    req = pb.SelectRequest(session_id=session_id, ids=codec.encode(ids), labels=codec.encode(labels),
                           budget=budget, **kw)
    if inputs is not None:
        req.inputs.CopyFrom(codec.encode(inputs))
    return req


def expect_code(code, fn, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kwargs)
    assert err.value.code() == code, err.value.details()
    return err.value.details()


@pytest.fixture(scope="module")
def ready_session(stub, model):
    """A high_loss session with `model`'s weights loaded."""
    sid = open_session(stub).session_id
    upload(stub, sid, model)
    return sid


def assert_serves(stub, session_id):
    """After an error the same server must still answer a valid Select."""
    ids, inputs, labels = make_pool(16, seed=99)
    resp = stub.Select(select_request(session_id, ids, inputs, labels, 4), timeout=TIMEOUT)
    assert codec.decode(resp.selected_ids).numel() == 4


# -- the happy path -------------------------------------------------------------------


def test_open_session_reports_strategy_details(stub):
    resp = open_session(stub, strategy="high_loss")
    assert resp.session_id and resp.strategy == "high_loss"
    assert list(resp.signals) == ["loss"] and resp.device == "cpu"
    assert resp.policy == "topk" and resp.default_mode == "online"
    assert json.loads(resp.resolved_options_json) == {}
    other = open_session(stub, strategy="high_loss")
    assert other.session_id != resp.session_id


def test_chunked_upload_reports_bytes_and_version(stub, model):
    sid = open_session(stub).session_id
    resp, size = upload(stub, sid, model, version=7, chunk=777)
    assert resp.version == 7 and resp.bytes_received == size


def test_high_loss_selects_the_highest_loss_samples(stub, ready_session, model):
    ids, inputs, labels = make_pool(64)
    resp = stub.Select(select_request(ready_session, ids, inputs, labels, 10, return_scores=True,
                                      progress=pb.Progress(epoch=1, step=5)), timeout=TIMEOUT)
    selected = codec.decode(resp.selected_ids)
    assert selected.dtype == torch.int64 and selected.numel() == 10
    assert set(selected.tolist()) <= set(ids.tolist())
    assert len(set(selected.tolist())) == 10
    with torch.no_grad():
        losses = F.cross_entropy(model(inputs), labels, reduction="none")
    expected = set(ids[losses.topk(10).indices].tolist())
    assert set(selected.tolist()) == expected
    scores = codec.decode(resp.scores)
    assert torch.allclose(scores, losses, atol=1e-4)
    assert resp.checkpoint_version == 1
    assert resp.cost.samples_scored == 64
    assert resp.cost.compute_seconds > 0 and resp.cost.codec_seconds > 0


def test_select_stream_equals_select_on_the_concatenation(stub, ready_session):
    ids, inputs, labels = make_pool(60, seed=3)
    whole = stub.Select(select_request(ready_session, ids, inputs, labels, 12, return_scores=True), timeout=TIMEOUT)

    def messages():
        yield pb.SelectRequest(session_id=ready_session, budget=12, return_scores=True)  # header only
        for start in range(0, 60, 25):  # uneven chunks: 25, 25, 10
            sl = slice(start, start + 25)
            yield select_request("", ids[sl], inputs[sl], labels[sl], 0)

    streamed = stub.SelectStream(messages(), timeout=TIMEOUT)
    assert codec.decode(streamed.selected_ids).tolist() == codec.decode(whole.selected_ids).tolist()
    assert torch.allclose(codec.decode(streamed.scores), codec.decode(whole.scores))
    assert streamed.cost.samples_scored == 60


def test_random_needs_no_inputs_or_checkpoint(stub):
    sid = open_session(stub, strategy="random", seed=3).session_id
    ids, _, labels = make_pool(40)
    resp = stub.Select(select_request(sid, ids, None, labels, 8), timeout=TIMEOUT)
    selected = codec.decode(resp.selected_ids).tolist()
    assert len(set(selected)) == 8 and set(selected) <= set(ids.tolist())
    assert resp.checkpoint_version == -1


def test_report_and_close(stub):
    sid = open_session(stub, strategy="random").session_id
    ids = torch.arange(5, dtype=torch.int64)
    resp = stub.Report(pb.ReportRequest(session_id=sid, ids=codec.encode(ids),
                                        losses=codec.encode(torch.rand(5)),
                                        correct=codec.encode(torch.ones(5, dtype=torch.bool))), timeout=TIMEOUT)
    assert resp.samples == 5
    assert stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=TIMEOUT).closed
    ids, _, labels = make_pool(8)
    details = expect_code(grpc.StatusCode.NOT_FOUND, stub.Select, select_request(sid, ids, None, labels, 2), timeout=TIMEOUT)
    assert "OpenSession" in details
    expect_code(grpc.StatusCode.NOT_FOUND, stub.CloseSession, pb.CloseSessionRequest(session_id=sid), timeout=TIMEOUT)


def test_health_is_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "dataselect.v1.Selection"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=TIMEOUT)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"dataselect.v1.Selection", "grpc.health.v1.Health"} <= names


def test_describe(stub, server):
    resp = stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT)
    by_name = {s.name: s for s in resp.strategies}
    assert {"random", "high_loss"} <= set(by_name)
    assert by_name["high_loss"].plugin == "dataselect.plugins.builtin_strategies"
    assert by_name["high_loss"].default_policy == "topk"
    assert MODEL in resp.models and "cnn-small" in resp.models
    assert resp.device == "cpu" and resp.max_message_bytes == 8 * 2**20
    assert resp.version


# -- errors: the right code, a useful message, and the server keeps serving -----------------


def test_select_before_checkpoint_is_failed_precondition(stub, ready_session):
    sid = open_session(stub).session_id
    ids, inputs, labels = make_pool(8)
    details = expect_code(grpc.StatusCode.FAILED_PRECONDITION, stub.Select,
                          select_request(sid, ids, inputs, labels, 2), timeout=TIMEOUT)
    assert "UploadCheckpoint" in details
    assert_serves(stub, ready_session)


def test_unknown_strategy_lists_known_names(stub, ready_session):
    details = expect_code(grpc.StatusCode.INVALID_ARGUMENT, open_session, stub, strategy="no_such_strategy")
    assert "no_such_strategy" in details and "high_loss" in details and "random" in details
    assert_serves(stub, ready_session)


@pytest.mark.parametrize("field", ["options_json", "kwargs_json"])
def test_bad_json_is_invalid_argument(stub, ready_session, field):
    req = pb.OpenSessionRequest(strategy="random", options_json="{}", num_classes=10,
                                model=pb.ModelSpec(name=MODEL, kwargs_json=json.dumps(KWARGS)))
    if field == "options_json":
        req.options_json = "{not json"
    else:
        req.model.kwargs_json = "[1, 2]"
    details = expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.OpenSession, req, timeout=TIMEOUT)
    assert field in details
    assert_serves(stub, ready_session)


def test_bytes_not_matching_shape_is_invalid_argument(stub, ready_session):
    ids, inputs, labels = make_pool(8)
    req = select_request(ready_session, ids, inputs, labels, 2)
    req.inputs.data = req.inputs.data[:-3]
    details = expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.Select, req, timeout=TIMEOUT)
    assert "inputs" in details and "do not match" in details
    assert_serves(stub, ready_session)


def test_checkpoint_for_another_architecture_is_invalid_argument(stub, ready_session):
    sid = open_session(stub).session_id
    torch.manual_seed(1)
    cnn = build_model("cnn-small", **KWARGS)
    details = expect_code(grpc.StatusCode.INVALID_ARGUMENT, upload, stub, sid, cnn, model_name="cnn-small")
    assert "cnn-small" in details and MODEL in details
    # Same name but other arguments: the weights do not fit.
    wide = build_model(MODEL, **KWARGS, hidden=64)
    details = expect_code(grpc.StatusCode.INVALID_ARGUMENT, upload, stub, sid, wide, chunk=100)
    assert "does not fit" in details
    assert_serves(stub, ready_session)


def test_garbage_checkpoint_is_invalid_argument(stub, ready_session):
    def chunks():
        yield pb.CheckpointChunk(session_id=ready_session, version=9, data=b"not a checkpoint")

    expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.UploadCheckpoint, chunks(), timeout=TIMEOUT)
    assert_serves(stub, ready_session)


def test_budget_larger_than_pool_is_invalid_argument(stub, ready_session):
    ids, inputs, labels = make_pool(4)
    details = expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.Select,
                          select_request(ready_session, ids, inputs, labels, 5), timeout=TIMEOUT)
    assert "budget" in details
    assert_serves(stub, ready_session)


def test_message_over_the_size_limit_is_resource_exhausted(stub, ready_session):
    ids, inputs, labels = make_pool(12_000)  # ~9.4 MB of images > the 8 MiB limit
    expect_code(grpc.StatusCode.RESOURCE_EXHAUSTED, stub.Select,
                select_request(ready_session, ids, inputs, labels, 2), timeout=TIMEOUT)
    assert_serves(stub, ready_session)


def test_unexpected_exception_is_internal_and_server_survives(stub, server, ready_session, monkeypatch):
    def broken():
        raise ZeroDivisionError("boom")

    # The servicer's handlers are bound at start-up; break something they call instead.
    monkeypatch.setattr("dataselect.server.service.strategies", broken)
    details = expect_code(grpc.StatusCode.INTERNAL, stub.Describe, pb.DescribeRequest(), timeout=TIMEOUT)
    assert "ZeroDivisionError" in details and "boom" in details
    assert_serves(stub, ready_session)


def test_second_server_on_a_used_port_is_refused(server):
    with pytest.raises(AddressInUse, match="--port"):
        with serve(port=server.port):
            pass


# -- the remote client -----------------------------------------------------------------------


def spec(strategy="high_loss", seed=5, model_name=MODEL):
    return SessionSpec(strategy=strategy, options={}, model_name=model_name, model_kwargs=dict(KWARGS),
                       num_classes=10, seed=seed, dataset="test", dataset_size=10_000)


@pytest.mark.parametrize("strategy", ["high_loss", "random"])
def test_remote_matches_embedded(server, model, strategy):
    ids, inputs, labels = make_pool(48, seed=11)
    embedded = EmbeddedScorer(spec(strategy))
    with RemoteScorer(server.address, spec(strategy), chunk_bytes=4096) as remote:
        assert remote.info.signals == embedded.info.signals
        assert remote.info.policy == embedded.info.policy
        for scorer in (embedded, remote):
            scorer.push_checkpoint(model, version=3, step=30)
        for _ in range(2):  # twice: the seeded generators must advance alike
            a = embedded.select(ids, inputs, labels, 9, Progress(step=1), return_scores=True)
            b = remote.select(ids, inputs, labels, 9, Progress(step=1), return_scores=True)
            assert b.selected_ids.tolist() == a.selected_ids.tolist()
            assert b.checkpoint_version == a.checkpoint_version == 3
            assert b.samples_scored == 48
            assert b.transfer_seconds >= 0 and b.server_compute_seconds > 0
            if a.scores is not None:
                assert torch.allclose(a.scores, b.scores, atol=1e-5)
        assert remote.counters.checkpoint_pushes == 1
        assert remote.counters.checkpoint_bytes == len(to_bytes(make_checkpoint(MODEL, KWARGS, model, version=3, step=30)))
    embedded.close()


def test_remote_streams_pools_larger_than_its_message_limit(server, model):
    ids, inputs, labels = make_pool(600, seed=12)  # ~470 KB of images
    with RemoteScorer(server.address, spec(), max_message_bytes=256 * 1024) as remote:
        remote.push_checkpoint(model, version=1, step=0)
        reply = remote.select(ids, inputs, labels, 20, Progress())
    with torch.no_grad():
        losses = F.cross_entropy(model(inputs), labels, reduction="none")
    assert set(reply.selected_ids.tolist()) == set(ids[losses.topk(20).indices].tolist())


def test_remote_maps_status_codes_to_errors(server, model):
    # The *server* lacks it (a plugin installed on the trainer's side only): say so, and what it has.
    with pytest.raises(InvalidArgument, match=r"scoring server at .* has no strategy 'nope' \(it has: .*high_loss"):
        RemoteScorer(server.address, spec(strategy="nope"))
    with pytest.raises(InvalidArgument, match=r"has no model 'resnet9000' \(it has: .*mlp.*`dataselect models`"):
        RemoteScorer(server.address, spec(model_name="resnet9000"))
    remote = RemoteScorer(server.address, spec(), retry_seconds=0)  # 0: no reopening of a lost session
    ids, inputs, labels = make_pool(8)
    with pytest.raises(FailedPrecondition, match="checkpoint"):
        remote.select(ids, inputs, labels, 2, Progress())
    server.store.close(remote.info.session_id)  # e.g. the server dropped the session
    with pytest.raises(NotFound):
        remote.select(ids, inputs, labels, 2, Progress())
    remote.close()
    remote.close()  # idempotent


def test_remote_unreachable_server_names_the_fix():
    with serve(port=0) as tmp:
        port = tmp.port  # a port that was free a moment ago and is closed now
    with pytest.raises(ServerUnavailable) as err:
        RemoteScorer(f"127.0.0.1:{port}", spec(), connect_timeout=0.5)
    message = str(err.value)
    assert f"dataselect-server --port {port}" in message and "\n" not in message
