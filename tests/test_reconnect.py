"""RemoteScorer survives a server restart (SIGKILL, new server on the same port) and falls back to
embedded scoring when no server comes back; SIGTERM lets a call in flight finish."""

from __future__ import annotations

import logging
import os
import signal
import sys
import textwrap
import threading
import time

import pytest
import torch

from dataselect.client.remote import RemoteScorer, ServerUnavailable
from dataselect.client.scorer import EmbeddedScorer, SessionSpec
from dataselect.models import build_model
from dataselect.plugins.base import Progress
from pools import random_pool

sys.path.insert(0, os.path.dirname(__file__))
from conftest import SERVER_STOP_TIMEOUT as STOP_TIMEOUT, ServerProcess  # noqa: E402

KWARGS = dict(num_classes=10, in_channels=1, image_size=8)
SPEC = SessionSpec("high_loss", {}, "mlp", dict(KWARGS), num_classes=10, seed=3)


@pytest.fixture
def servers():
    procs: list[ServerProcess] = []

    def start(*args: str, env: dict | None = None) -> ServerProcess:
        procs.append(ServerProcess(("--device", "cpu", *args), env={**os.environ, **(env or {})}))
        return procs[-1]

    yield start
    for p in procs:
        p.kill()


def pool(n=32, seed=0):
    return random_pool(n, seed, size=8)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("mlp", **KWARGS).eval()


def test_select_survives_a_sigkill_and_restart_on_the_same_port(servers, model):
    first = servers("--port", "0")
    address = first.wait_for_address()
    port = address.rsplit(":", 1)[1]
    ids, inputs, labels = pool()
    with RemoteScorer(address, SPEC, retry_seconds=60, timeout=20) as remote:
        remote.push_checkpoint(model, version=5, step=50)
        before = remote.select(ids, inputs, labels, 8, Progress())
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=STOP_TIMEOUT)

        result = {}

        def keep_training():  # the trainer's next select runs into the dead server and retries
            try:
                result["reply"] = remote.select(ids, inputs, labels, 8, Progress())
            except BaseException as exc:  # noqa: BLE001
                result["error"] = exc

        worker = threading.Thread(target=keep_training)
        worker.start()
        second = servers("--port", port)
        assert second.wait_for_address().endswith(f":{port}")
        worker.join(timeout=90)
        assert not worker.is_alive(), "select did not return after the server came back"
        assert "error" not in result, result.get("error")
        after = result["reply"]
        # The new session got the last pushed checkpoint: same weights, same answer.
        assert after.checkpoint_version == 5
        assert after.selected_ids.tolist() == before.selected_ids.tolist()
        assert remote.counters.reconnects == 1
        assert remote.select(ids, inputs, labels, 8, Progress()).checkpoint_version == 5
        assert remote.counters.reconnects == 1
        assert "fallback" not in remote.counters.extra


def test_fallback_to_embedded_when_no_server_comes_back(servers, model, caplog):
    server = servers("--port", "0")
    address = server.wait_for_address()
    ids, inputs, labels = pool()
    with RemoteScorer(address, SPEC, retry_seconds=1.5, on_server_failure="fallback") as remote:
        remote.push_checkpoint(model, version=2, step=20)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=STOP_TIMEOUT)
        with caplog.at_level(logging.WARNING, logger="dataselect.client"):
            reply = remote.select(ids, inputs, labels, 8, Progress())
            again = remote.select(ids, inputs, labels, 8, Progress())
        assert remote.fallen_back and remote.counters.extra["fallback"] == 1
        assert sum("in-process" in r.getMessage() for r in caplog.records) == 1  # warned once
        embedded = EmbeddedScorer(SPEC)
        embedded.push_checkpoint(model, 2, 20)
        expected = embedded.select(ids, inputs, labels, 8, Progress())
        assert reply.selected_ids.tolist() == again.selected_ids.tolist() == expected.selected_ids.tolist()
        assert reply.checkpoint_version == 2
        remote.push_checkpoint(model, version=3, step=30)
        assert remote.select(ids, inputs, labels, 8, Progress()).checkpoint_version == 3
        embedded.close()


def test_retry_mode_gives_up_after_its_budget(servers, model):
    server = servers("--port", "0")
    address = server.wait_for_address()
    with RemoteScorer(address, SPEC, retry_seconds=1.0) as remote:
        remote.push_checkpoint(model, version=1, step=0)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=STOP_TIMEOUT)
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailable, match="gave up reconnecting"):
            remote.select(*pool(), 8, Progress())
        assert time.monotonic() - t0 < 15


def test_one_retry_budget_per_outage_shared_by_every_call(servers, model):
    """--retry-seconds bounds the whole outage: the calls that meet it one after another (a push, then the
    Selects queued behind it) share one budget instead of each waiting its own."""
    server = servers("--port", "0")
    address = server.wait_for_address()
    with RemoteScorer(address, SPEC, retry_seconds=1.5) as remote:
        remote.push_checkpoint(model, version=1, step=0)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=STOP_TIMEOUT)
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailable, match="gave up reconnecting"):
            remote.push_checkpoint(model, version=2, step=1)
        for _ in range(3):
            with pytest.raises(ServerUnavailable, match="gave up reconnecting"):
                remote.select(*pool(), 8, Progress())
        assert time.monotonic() - t0 < 1.5 + 2.0


@pytest.mark.parametrize("address,words", [("localhost50051", ("no port", "localhost:50051")),
                                           ("http://127.0.0.1:50051", ("URL", "http://")),
                                           ("127.0.0.1:99999", ("port 1-65535",)), ("", ("empty",))])
def test_a_malformed_address_fails_at_once(address, words):
    from dataselect.errors import InvalidArgument

    t0 = time.monotonic()
    with pytest.raises(InvalidArgument) as err:
        RemoteScorer(address, SPEC, connect_timeout=30)
    assert time.monotonic() - t0 < 1.0  # no connection attempt
    for word in words:
        assert word in str(err.value)


SLOW_PLUGIN = textwrap.dedent('''
    import os, pathlib, time
    from dataselect.plugins.base import Strategy
    from dataselect.plugins.hookspecs import hookimpl
    import torch

    class Slow(Strategy):
        name = "slow_for_test"
        description = "announces itself, then takes a while"
        default_mode = "online"
        default_policy = "topk"
        signals = frozenset()

        def score(self, pool):
            pathlib.Path(os.environ["SLOW_MARKER"]).touch()
            time.sleep(2.0)
            return torch.arange(len(pool), dtype=torch.float32)

    @hookimpl
    def register_strategies(register):
        register(Slow)
''')


def test_sigterm_finishes_the_call_in_flight(servers, tmp_path):
    (tmp_path / "slow_plugin_for_test.py").write_text(SLOW_PLUGIN)
    (tmp_path / "sitecustomize.py").write_text(
        "from dataselect.plugins import register_plugin\n"
        "import slow_plugin_for_test\n"
        "register_plugin(slow_plugin_for_test, 'slow-plugin')\n")
    marker = tmp_path / "started"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "SLOW_MARKER": str(marker)}
    server = servers("--port", "0", "--grace-seconds", "20", env=env)
    address = server.wait_for_address()
    spec = SessionSpec("slow_for_test", {}, "mlp", dict(KWARGS), num_classes=10)
    result = {}
    with RemoteScorer(address, spec, retry_seconds=0) as remote:
        def select():
            try:
                result["reply"] = remote.select(torch.arange(10), None, torch.zeros(10, dtype=torch.long), 3, Progress())
            except BaseException as exc:  # noqa: BLE001
                result["error"] = exc

        worker = threading.Thread(target=select)
        worker.start()
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline, "the slow call never started"
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        worker.join(timeout=30)
        assert "error" not in result, result.get("error")
        assert result["reply"].selected_ids.tolist() == [9, 8, 7]
    assert server.proc.wait(timeout=30) == 0
