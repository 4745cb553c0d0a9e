"""The real `dataselect-server` console script, run as a subprocess."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

START_TIMEOUT = 60  # importing torch on a cold, busy CI machine can take a while
STOP_TIMEOUT = 10


def server_command() -> list[str]:
    script = shutil.which("dataselect-server", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "dataselect.server.cli"]


class ServerProcess:
    """The server subprocess with its stdout read on a thread, so waiting never blocks on a pipe."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(server_command() + list(args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for_address(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    pytest.fail(f"server exited with {self.proc.returncode}: {self.proc.stderr.read()}")
                continue
            match = re.match(r"listening on (\S+:\d+)$", line.strip())
            if match:
                return match.group(1)
        pytest.fail("server did not print 'listening on HOST:PORT' in time")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def started():
    procs: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        procs.append(ServerProcess(*args))
        return procs[-1]

    yield start
    for p in procs:
        p.kill()


def test_serves_health_and_stops_cleanly_on_sigterm(started):
    server = started("--device", "cpu", "--port", "0", "--log-level", "info")
    address = server.wait_for_address()
    port = int(address.rsplit(":", 1)[1])
    assert port > 0
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        resp = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="dataselect.v1.Selection"), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING

    # A second server on the same port is refused with a one-line error naming --port.
    second = subprocess.run(server_command() + ["--device", "cpu", "--port", str(port)],
                            capture_output=True, text=True, timeout=START_TIMEOUT)
    assert second.returncode != 0
    assert "--port" in second.stderr and "Traceback" not in second.stderr
    # One line, ours: grpc's own "add_port ... Failed to add port" log line no longer comes first.
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "in use" in lines[0], second.stderr

    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=STOP_TIMEOUT) == 0
    stderr = server.proc.stderr.read()
    assert "Traceback" not in stderr
    assert "device cpu" in stderr and "high_loss" in stderr  # the start-up log line


def test_unknown_device_is_a_one_line_error():
    result = subprocess.run(server_command() + ["--device", "tpu9", "--port", "0"],
                            capture_output=True, text=True, timeout=START_TIMEOUT)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "tpu9" in lines[0] and "--device" in lines[0]
