"""Tokens, TLS, session isolation and --checkpoint-dir confinement."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dataselect import codec
from dataselect.checkpoint import make_checkpoint, save_checkpoint
from dataselect.client.remote import RemoteScorer
from dataselect.client.scorer import SessionSpec
from dataselect.errors import DataselectError
from dataselect.models import build_model
from dataselect.plugins.base import Progress
from dataselect.server import serve
from dataselect.server.app import is_loopback
from dataselect.v1 import selection_pb2 as pb
from dataselect.v1 import selection_pb2_grpc as pb_grpc

C = grpc.StatusCode
KWARGS = dict(num_classes=10, in_channels=1, image_size=8)
TIMEOUT = 20
ALICE, BOB = "alice-token-0123456789", "bob-token-9876543210"


def bearer(token):
    return (("authorization", f"Bearer {token}"),)


def open_req(strategy="random"):
    return pb.OpenSessionRequest(strategy=strategy, num_classes=10,
                                 model=pb.ModelSpec(name="mlp", kwargs_json=json.dumps(KWARGS)))


def pool_req(sid, n=8):
    return pb.SelectRequest(session_id=sid, budget=2, ids=codec.encode(torch.arange(n)),
                            labels=codec.encode(torch.zeros(n, dtype=torch.int64)))


def code_of(fn, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, timeout=TIMEOUT, **kwargs)
    return err.value.code(), err.value.details()


@pytest.fixture(scope="module")
def authed(tmp_path_factory):
    token_file = tmp_path_factory.mktemp("tokens") / "tokens"
    token_file.write_text(f"# one token per line\n{ALICE}\n\n{BOB}\n")
    from dataselect.server.auth import read_tokens

    with serve(port=0, tokens=read_tokens(token_file)) as running, grpc.insecure_channel(running.address) as ch:
        yield running, ch


def test_default_host_is_loopback():
    import inspect

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def test_public_host_without_token_warns(caplog):
    with serve(host="0.0.0.0", port=0):
        pass
    assert any("without a token" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with serve(host="0.0.0.0", port=0, tokens=[ALICE]):
        pass
    assert not any("without a token" in r.getMessage() for r in caplog.records)


def test_every_call_but_health_needs_the_token(authed):
    running, ch = authed
    stub = pb_grpc.SelectionStub(ch)
    code, details = code_of(stub.Describe, pb.DescribeRequest())
    assert code == C.UNAUTHENTICATED and "authorization: Bearer" in details
    code, details = code_of(stub.Describe, pb.DescribeRequest(), metadata=bearer("alice-token-012345678X"))
    assert code == C.UNAUTHENTICATED and "wrong token" in details
    assert code_of(stub.OpenSession, open_req())[0] == C.UNAUTHENTICATED
    assert code_of(stub.UploadCheckpoint, iter([pb.CheckpointChunk(session_id="x")]))[0] == C.UNAUTHENTICATED
    assert code_of(stub.Describe, pb.DescribeRequest(), metadata=(("authorization", ALICE),))[0] == C.UNAUTHENTICATED
    assert stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT, metadata=bearer(ALICE)).version
    assert stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT, metadata=bearer(BOB)).version
    health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_the_token_is_compared_in_constant_time():
    import inspect

    from dataselect.server import auth

    assert "hmac.compare_digest" in inspect.getsource(auth.AuthInterceptor)


def test_sessions_belong_to_their_token(authed):
    running, ch = authed
    stub = pb_grpc.SelectionStub(ch)
    sid = stub.OpenSession(open_req(), timeout=TIMEOUT, metadata=bearer(ALICE)).session_id
    assert len(sid) >= 20  # secrets.token_urlsafe(16)
    assert stub.Select(pool_req(sid), timeout=TIMEOUT, metadata=bearer(ALICE)).selected_ids.shape == [2]
    # Bob holds a valid token and Alice's session id, and is told the session does not exist.
    for call, request in ((stub.Select, pool_req(sid)), (stub.CloseSession, pb.CloseSessionRequest(session_id=sid)),
                          (stub.Report, pb.ReportRequest(session_id=sid))):
        code, details = code_of(call, request, metadata=bearer(BOB))
        assert code == C.NOT_FOUND and "unknown session" in details
    assert stub.Select(pool_req(sid), timeout=TIMEOUT, metadata=bearer(ALICE)).selected_ids.shape == [2]


def test_remote_scorer_sends_the_token(authed, tmp_path, monkeypatch):
    running, _ = authed
    spec = SessionSpec("random", {}, "mlp", dict(KWARGS), num_classes=10)
    with pytest.raises(DataselectError, match="token"):
        RemoteScorer(running.address, spec)
    file = tmp_path / "token"
    file.write_text(BOB + "\n")
    with RemoteScorer(running.address, spec, token_file=file) as remote:
        assert remote.select(torch.arange(8), None, torch.zeros(8, dtype=torch.long), 3, Progress()).selected_ids.numel() == 3
    monkeypatch.setenv("DATASELECT_TOKEN", ALICE)
    with RemoteScorer(running.address, spec) as remote:
        assert remote.info.session_id


def _self_signed(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    result = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {result.stderr.strip()[:200]}")
    return cert, key


def test_tls(tmp_path):
    cert, key = _self_signed(tmp_path)
    spec = SessionSpec("random", {}, "mlp", dict(KWARGS), num_classes=10)
    with serve(port=0, tls_cert=cert, tls_key=key, tokens=[ALICE]) as running:
        with RemoteScorer(running.address, spec, tls_ca=cert, token=ALICE) as remote:
            reply = remote.select(torch.arange(8), None, torch.zeros(8, dtype=torch.long), 3, Progress())
            assert reply.selected_ids.numel() == 3
        # A plaintext client cannot talk to the TLS port.
        with grpc.insecure_channel(running.address) as ch:
            code, _ = code_of(pb_grpc.SelectionStub(ch).Describe, pb.DescribeRequest(), metadata=bearer(ALICE))
            assert code == C.UNAVAILABLE


@pytest.fixture
def ckpt_dir(tmp_path):
    root = tmp_path / "ckpts"
    root.mkdir()
    torch.manual_seed(0)
    save_checkpoint(make_checkpoint("mlp", KWARGS, build_model("mlp", **KWARGS)), root / "good.pt")
    outside = tmp_path / "outside.pt"
    save_checkpoint(make_checkpoint("mlp", KWARGS, build_model("mlp", **KWARGS)), outside)
    os.symlink(outside, root / "link.pt")
    os.symlink(root / "good.pt", root / "inner-link.pt")
    return root


def upload_path(stub, sid, path, timeout=TIMEOUT):
    return stub.UploadCheckpoint(iter([pb.CheckpointChunk(session_id=sid, version=4, path=path)]), timeout=timeout)


def test_checkpoint_paths_stay_inside_the_checkpoint_dir(ckpt_dir):
    with serve(port=0, checkpoint_dir=ckpt_dir) as running, grpc.insecure_channel(running.address) as ch:
        stub = pb_grpc.SelectionStub(ch)
        sid = stub.OpenSession(open_req("high_loss"), timeout=TIMEOUT).session_id
        assert upload_path(stub, sid, "good.pt").version == 4
        assert upload_path(stub, sid, "inner-link.pt").version == 4  # a symlink that stays inside is fine
        for escape in ("../outside.pt", "link.pt", str(ckpt_dir.parent / "outside.pt"), "../../../../etc/passwd"):
            code, details = code_of(upload_path, stub, sid, escape)
            assert code == C.INVALID_ARGUMENT and "outside" in details, (escape, details)
        code, details = code_of(upload_path, stub, sid, "missing.pt")
        assert code == C.INVALID_ARGUMENT and "not a file" in details


def test_without_checkpoint_dir_paths_are_refused(ckpt_dir):
    with serve(port=0) as running, grpc.insecure_channel(running.address) as ch:
        stub = pb_grpc.SelectionStub(ch)
        sid = stub.OpenSession(open_req("high_loss"), timeout=TIMEOUT).session_id
        code, details = code_of(upload_path, stub, sid, str(ckpt_dir / "good.pt"))
        assert code == C.FAILED_PRECONDITION and "--checkpoint-dir" in details
