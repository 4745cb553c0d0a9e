"""The real `dataselect-server` console script, run as a subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

START_TIMEOUT = 60  # importing torch on a cold, busy CI machine can take a while
STOP_TIMEOUT = 10
# The server subprocess fixtures (`server_process`, `server_command`) are in conftest.py.


def test_serves_health_and_stops_cleanly_on_sigterm(server_process, server_command):
    server = server_process("--device", "cpu", "--port", "0", "--log-level", "info")
    address = server.wait_for_address()
    port = int(address.rsplit(":", 1)[1])
    assert port > 0
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        resp = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="dataselect.v1.Selection"), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING

    # A second server on the same port is refused with a one-line error naming --port.
    second = subprocess.run(server_command + ["--device", "cpu", "--port", str(port)],
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


def test_unknown_device_is_a_one_line_error(server_command):
    result = subprocess.run(server_command + ["--device", "tpu9", "--port", "0"],
                            capture_output=True, text=True, timeout=START_TIMEOUT)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "tpu9" in lines[0] and "--device" in lines[0]


_HEAVY = ("torch", "grpc", "google.protobuf", "numpy")
_PARSE_ONLY = r"""
import json, sys
from dataselect.server.cli import main
codes = []
for argv in (["--help"], ["--port", "x"]):
    try:
        main(argv)
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps({"codes": codes, "loaded": [m for m in %r if m in sys.modules]}))
""" % (_HEAVY,)


def test_help_and_argument_errors_load_neither_torch_nor_grpc():
    """`dataselect-server --help` and a bad argument answer from click alone: torch and grpc are imported
    only when the server starts."""
    out = subprocess.run([sys.executable, "-c", _PARSE_ONLY], capture_output=True, text=True, timeout=START_TIMEOUT)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["codes"] == [0, 2]
    assert got["loaded"] == []
