"""Stalled clients and stopping: silent streams hold no scoring slot and are ended after
--stream-idle-seconds, a stalled session never stops the cleanup of the others, expired calls stop
computing, and the server drains (health NOT_SERVING, new calls UNAVAILABLE) and stops within its
grace period."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import textwrap
import threading
import time
from concurrent import futures

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

from dataselect import codec
from dataselect.checkpoint import make_checkpoint, to_bytes
from dataselect.models import build_model
from dataselect.plugins import register_plugin, unregister_plugin
from dataselect.plugins.hookspecs import hookimpl
from dataselect.server import serve
from dataselect.v1 import selection_pb2 as pb
from dataselect.v1 import selection_pb2_grpc as pb_grpc

sys.path.insert(0, os.path.dirname(__file__))
from conftest import ServerProcess  # noqa: E402

C = grpc.StatusCode
KWARGS = dict(num_classes=10, in_channels=1, image_size=8, mean=(0.5,), std=(0.25,))
TIMEOUT = 20


def open_req(strategy="high_loss", model="mlp", kwargs=None):
    return pb.OpenSessionRequest(strategy=strategy, num_classes=10,
                                 model=pb.ModelSpec(name=model, kwargs_json=json.dumps(kwargs or KWARGS)))


def pool_req(sid, n=16, budget=4, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return pb.SelectRequest(session_id=sid, budget=budget, ids=codec.encode(torch.arange(n)),
                            inputs=codec.encode(torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)),
                            labels=codec.encode(torch.randint(0, 10, (n,), generator=g)), **kw)


def ready_session(stub, model="mlp", kwargs=None):
    sid = stub.OpenSession(open_req(model=model, kwargs=kwargs), timeout=TIMEOUT).session_id
    ckpt = make_checkpoint(model, kwargs or KWARGS, build_model(model, **(kwargs or KWARGS)))
    stub.UploadCheckpoint(iter([pb.CheckpointChunk(session_id=sid, version=1, data=to_bytes(ckpt))]), timeout=TIMEOUT)
    return sid


class Stall:
    """A client stream that sends its first message(s) and then nothing until `release()`."""

    def __init__(self, call, first: list):
        self.gate = threading.Event()

        def messages():
            yield from first
            self.gate.wait(60)

        self.future = call.future(messages(), timeout=60)

    def release(self):
        self.gate.set()


def wait_for(predicate, timeout=TIMEOUT, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- silent streams -------------------------------------------------------------------------------

def test_sixteen_silent_streams_block_no_other_client_and_are_ended():
    with serve(port=0, workers=2, stream_idle_seconds=4) as running, grpc.insecure_channel(running.address) as ch:
        stub = pb_grpc.SelectionStub(ch)
        stalled_sessions = [ready_session(stub) for _ in range(16)]
        canaries = [ready_session(stub) for _ in range(4)]
        stalls = [Stall(stub.SelectStream, [pb.SelectRequest(session_id=s, budget=4)]) for s in stalled_sessions]
        try:
            wait_for(lambda: running.limit.in_flight == 16, what="16 stalled streams in flight")
            # Every other client's call returns within its deadline (plus 1 s): more of them than --workers.
            deadline = 3.0

            def canary(i):
                t0 = time.monotonic()
                resp = stub.Select(pool_req(canaries[i % 4], seed=i), timeout=deadline)
                return time.monotonic() - t0, codec.decode(resp.selected_ids).numel()

            with futures.ThreadPoolExecutor(8) as ex:
                results = list(ex.map(canary, range(8)))
            assert all(n == 4 for _, n in results)
            assert max(t for t, _ in results) < deadline + 1.0
            # The stalls themselves are ended by the server, saying why.
            for stall in stalls:
                with pytest.raises(grpc.RpcError) as err:
                    stall.future.result(timeout=TIMEOUT)
                assert err.value.code() == C.DEADLINE_EXCEEDED, err.value.details()
                assert "--stream-idle-seconds" in err.value.details()
            wait_for(lambda: running.limit.in_flight == 0, what="the stalled calls to end")
            # Their sessions are free again.
            assert codec.decode(stub.Select(pool_req(stalled_sessions[0]), timeout=5).selected_ids).numel() == 4
        finally:
            for stall in stalls:
                stall.release()


def test_a_silent_checkpoint_upload_is_ended():
    with serve(port=0, stream_idle_seconds=1) as running, grpc.insecure_channel(running.address) as ch:
        stub = pb_grpc.SelectionStub(ch)
        sid = stub.OpenSession(open_req(), timeout=TIMEOUT).session_id
        data = to_bytes(make_checkpoint("mlp", KWARGS, build_model("mlp", **KWARGS)))
        for first in ([pb.CheckpointChunk(session_id=sid, version=1, data=data[:100])], []):
            stall = Stall(stub.UploadCheckpoint, first)
            try:
                with pytest.raises(grpc.RpcError) as err:
                    stall.future.result(timeout=TIMEOUT)
                assert err.value.code() == C.DEADLINE_EXCEEDED
                assert "--stream-idle-seconds" in err.value.details()
                assert ("first message" in err.value.details()) == (not first)
            finally:
                stall.release()


def test_stalled_sessions_never_stop_the_cleanup_of_idle_ones():
    with serve(port=0, session_ttl=0.5, stream_idle_seconds=30) as running, \
            grpc.insecure_channel(running.address) as ch:
        stub = pb_grpc.SelectionStub(ch)
        stalled = [ready_session(stub) for _ in range(16)]
        busy = stalled[0]
        busy_session = running.store.get(busy)
        stalls = [Stall(stub.SelectStream, [pb.SelectRequest(session_id=s, budget=4)]) for s in stalled]
        try:
            wait_for(lambda: running.limit.in_flight == 16, what="16 stalled streams")
            wait_for(busy_session.lock.locked, what="the stalled stream to hold its session")
            idle = [stub.OpenSession(open_req("random"), timeout=TIMEOUT).session_id for _ in range(3)]
            t0 = time.monotonic()
            wait_for(lambda: len(running.store) == 16, timeout=5, what="the idle sessions to be closed")
            assert time.monotonic() - t0 < 0.5 + 1.5  # the TTL, plus a reaper interval or two
            with pytest.raises(grpc.RpcError) as err:
                stub.Select(pb.SelectRequest(session_id=idle[0], budget=1), timeout=TIMEOUT)
            assert err.value.code() == C.NOT_FOUND
            # The busy session is not idle: still there. Closing it returns at once, and it closes
            # once its call has ended.
            t0 = time.monotonic()
            stub.CloseSession(pb.CloseSessionRequest(session_id=busy), timeout=TIMEOUT)
            assert time.monotonic() - t0 < 2.0 and not busy_session.closed
            assert len(running.store) == 15
        finally:
            for stall in stalls:
                stall.release()
        with pytest.raises(grpc.RpcError):
            stalls[0].future.result(timeout=TIMEOUT)
        wait_for(lambda: busy_session.closed, what="the busy session to close after its call")
        # The other stalled sessions finish their calls and, idle now, are closed by the TTL.
        wait_for(lambda: len(running.store) == 0, timeout=10, what="the formerly stalled sessions to expire")


# -- expired calls stop computing ------------------------------------------------------------------

class SlowNet(nn.Module):
    """A tiny classifier whose every forward pass takes `delay` seconds and is counted."""

    calls = 0

    def __init__(self, num_classes=10, in_channels=1, image_size=8, delay=0.02):
        super().__init__()
        self.delay = delay
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, 16), nn.ReLU())
        self.classifier = nn.Linear(16, num_classes)

    def features(self, x):
        type(self).calls += 1
        time.sleep(self.delay)
        return self.body(x.float() / 255)

    def forward(self, x):
        return self.classifier(self.features(x))


class SlowPlugin:
    @hookimpl
    def register_models(self, register):
        register("slow-net-for-test", SlowNet)


@pytest.fixture
def slow_model():
    register_plugin(SlowPlugin(), "slow-net-plugin-for-test")
    yield "slow-net-for-test"
    unregister_plugin("slow-net-plugin-for-test")


@pytest.mark.parametrize("method", ["Select", "SelectStream"])
def test_a_call_past_its_deadline_stops_between_micro_batches(slow_model, method):
    kwargs = dict(num_classes=10, in_channels=1, image_size=8)
    with serve(port=0, micro_batch=1) as running, grpc.insecure_channel(running.address) as ch:
        stub = pb_grpc.SelectionStub(ch)
        sid = ready_session(stub, model=slow_model, kwargs=kwargs)
        request = pool_req(sid, n=400, budget=8)  # 400 forward passes of 20 ms: 8 s of work
        with pytest.raises(grpc.RpcError) as err:
            if method == "Select":
                stub.Select(request, timeout=1.0)
            else:
                stub.SelectStream(iter([pb.SelectRequest(session_id=sid, budget=8), request]), timeout=1.0)
        assert err.value.code() == C.DEADLINE_EXCEEDED
        time.sleep(0.3)
        before = SlowNet.calls
        time.sleep(0.5)
        assert SlowNet.calls - before <= 1, "scoring went on after the caller's deadline"
        # The session is free for the next call at once (it waited 18 s behind the expired one before).
        resp = stub.Select(pool_req(sid, n=4, budget=2), timeout=5)
        assert resp.cost.queue_seconds < 1.0 and codec.decode(resp.selected_ids).numel() == 2


# -- stopping --------------------------------------------------------------------------------------

def test_stop_drains_with_health_not_serving_and_ends_within_the_grace_period(monkeypatch):
    import dataselect.scoring as scoring

    real, gate, entered = scoring.compute_signals, threading.Event(), threading.Event()

    def stuck(*args, **kwargs):  # ignores cancellation: the worst case for a clean stop
        entered.set()
        gate.wait(30)
        return real(*args, **kwargs)

    grace = 1.5
    server = serve(port=0, grace_seconds=grace)
    running = server.__enter__()
    ch = grpc.insecure_channel(running.address)
    try:
        stub = pb_grpc.SelectionStub(ch)
        sid = ready_session(stub)
        other = ready_session(stub)
        monkeypatch.setattr(scoring, "compute_signals", stuck)
        in_flight = stub.Select.future(pool_req(sid), timeout=30)
        assert entered.wait(TIMEOUT)
        stopped = {}

        def stop():
            t0 = time.monotonic()
            server.__exit__(None, None, None)
            stopped["seconds"] = time.monotonic() - t0

        stopper = threading.Thread(target=stop)
        stopper.start()
        health = health_pb2_grpc.HealthStub(ch)
        wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                 == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=grace, what="health NOT_SERVING")
        assert health.Check(health_pb2.HealthCheckRequest(service="dataselect.v1.Selection"), timeout=5).status \
            == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Select(pool_req(other), timeout=5)
        assert err.value.code() == C.UNAVAILABLE and "shutting down" in err.value.details()
        stopper.join(grace + 5)
        assert not stopper.is_alive() and stopped["seconds"] < grace + 1.0, stopped
        with pytest.raises(grpc.RpcError) as err:
            in_flight.result(timeout=5)
        assert err.value.code() in (C.CANCELLED, C.UNAVAILABLE)
    finally:
        gate.set()
        ch.close()


SLOW_PLUGIN = textwrap.dedent('''
    import os, pathlib, time
    from dataselect.plugins.base import Strategy
    from dataselect.plugins.hookspecs import hookimpl
    import torch

    class Stubborn(Strategy):
        name = "stubborn_for_test"
        description = "announces itself, then sleeps without ever checking for cancellation"
        default_mode = "online"
        default_policy = "topk"
        signals = frozenset()

        def score(self, pool):
            pathlib.Path(os.environ["SLOW_MARKER"]).touch()
            time.sleep(30)
            return torch.arange(len(pool), dtype=torch.float32)

    @hookimpl
    def register_strategies(register):
        register(Stubborn)
''')


def test_the_process_exits_within_its_grace_period_even_with_a_stuck_call(tmp_path):
    (tmp_path / "stubborn_plugin_for_test.py").write_text(SLOW_PLUGIN)
    (tmp_path / "sitecustomize.py").write_text(
        "from dataselect.plugins import register_plugin\n"
        "import stubborn_plugin_for_test\n"
        "register_plugin(stubborn_plugin_for_test, 'stubborn-plugin')\n")
    marker = tmp_path / "started"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               SLOW_MARKER=str(marker))
    server = ServerProcess(("--device", "cpu", "--port", "0", "--grace-seconds", "2", "--log-level", "info"), env=env)
    try:
        address = server.wait_for_address()
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.SelectionStub(ch)
            sid = stub.OpenSession(open_req("stubborn_for_test"), timeout=TIMEOUT).session_id
            call = stub.Select.future(pb.SelectRequest(session_id=sid, budget=2, ids=codec.encode(torch.arange(8)),
                                                       labels=codec.encode(torch.zeros(8, dtype=torch.long))),
                                      timeout=60)
            wait_for(marker.exists, what="the stuck call to start")
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(ch)
            # The signal reaches the serving loop within its 0.5 s poll; on a loaded machine a check sent at
            # once may still see SERVING, so watch it turn during the grace period.
            deadline = time.monotonic() + 1.5
            while True:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert server.proc.wait(timeout=30) == 0
            assert time.monotonic() - t0 < 2.0 + 1.5
            with pytest.raises(grpc.RpcError):
                call.result(timeout=5)
        stderr = server.proc.stderr.read()
        assert "Traceback" not in stderr and "grace period" in stderr
    finally:
        server.kill()


def test_a_cancelled_stream_logs_no_error(caplog):
    caplog.set_level(logging.INFO)
    with serve(port=0) as running, grpc.insecure_channel(running.address) as ch:
        stub = pb_grpc.SelectionStub(ch)
        sid = ready_session(stub)
        for _ in range(5):
            stall = Stall(stub.SelectStream, [pb.SelectRequest(session_id=sid, budget=4), pool_req(sid, budget=0)])
            wait_for(lambda: running.limit.in_flight == 1, what="the stream to reach the server")
            stall.future.cancel()
            stall.release()
            wait_for(lambda: running.limit.in_flight == 0, what="the cancelled stream to end")
        assert codec.decode(stub.Select(pool_req(sid), timeout=TIMEOUT).selected_ids).numel() == 4
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert not any("serializ" in r.getMessage() for r in caplog.records)


# -- memory ---------------------------------------------------------------------------------------

def test_memory_is_handed_back_after_sessions_close(monkeypatch):
    from dataselect.server import sessions

    if sys.platform.startswith("linux"):
        assert sessions.release_memory() is True  # glibc's malloc_trim is there
        assert sessions.tune_malloc(0, 0) is True  # nothing asked: nothing changed
        assert sessions.tune_malloc(8, 32 * 2**20) is True  # glibc accepts the server's settings
    calls = []
    monkeypatch.setattr(sessions, "release_memory", lambda: calls.append(time.monotonic()) or True)
    with serve(port=0, session_ttl=0.5) as running, grpc.insecure_channel(running.address) as ch:
        stub = pb_grpc.SelectionStub(ch)
        sids = [ready_session(stub) for _ in range(3)]
        assert not calls
        for sid in sids[:2]:
            stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=TIMEOUT)
        wait_for(lambda: len(calls) >= 1, timeout=5, what="a trim after CloseSession")
        n = len(calls)
        wait_for(lambda: len(running.store) == 0, timeout=5, what="the TTL to close the last session")
        wait_for(lambda: len(calls) > n, timeout=5, what="a trim after the TTL closed a session")
    with serve(port=0, trim_memory=False) as running, grpc.insecure_channel(running.address) as ch:
        stub = pb_grpc.SelectionStub(ch)
        calls.clear()
        stub.CloseSession(pb.CloseSessionRequest(session_id=ready_session(stub)), timeout=TIMEOUT)
        time.sleep(0.5)
        assert not calls
