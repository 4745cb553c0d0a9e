"""Fixtures shared by the test modules: an in-process scoring server and `dataselect-server` subprocesses.

`server` (module scope) is `dataselect.server.serve(port=0, device="cpu", workers=2)`;
a module that needs other settings overrides the `server_options` fixture, e.g.

    @pytest.fixture(scope="module")
    def server_options():
        return {"max_message_bytes": 8 * 2**20, "workers": 4}

`server_process` starts the real console script (or any command that prints
`listening on HOST:PORT`) and stops whatever it started at teardown.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Sequence

import pytest

#: Importing torch on a cold, busy CI machine can take a while.
SERVER_START_TIMEOUT = 60
SERVER_STOP_TIMEOUT = 15


@pytest.fixture(scope="module")
def server_options() -> dict:
    """Keyword arguments for `serve()` beyond the defaults below; override it in a module."""
    return {}


@pytest.fixture(scope="module")
def server(server_options):
    """An in-process scoring server on a free port, shared by the tests of one module."""
    from dataselect.server import serve

    with serve(port=0, **{"device": "cpu", "workers": 2, **server_options}) as running:
        yield running


def _server_command() -> list[str]:
    """The `dataselect-server` console script next to this interpreter (`python -m` where it is not installed)."""
    script = shutil.which("dataselect-server", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "dataselect.server.cli"]


class ServerProcess:
    """A server subprocess with its stdout read on a thread, so waiting never blocks on a pipe.

    As a context manager it is stopped when the block ends (else at the fixture's teardown)."""

    def __init__(self, args: Sequence[str], command: Sequence[str] | None = None, env: dict | None = None):
        self.proc = subprocess.Popen([*(command or _server_command()), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for_address(self) -> str:
        """HOST:PORT from the server's `listening on` line; fails the test if it exits or is silent too long."""
        deadline = time.monotonic() + SERVER_START_TIMEOUT
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

    def stop(self):
        """SIGTERM, then SIGKILL if it has not exited within SERVER_STOP_TIMEOUT."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture
def server_command() -> list[str]:
    """The command that starts `dataselect-server` (add its arguments)."""
    return _server_command()


@pytest.fixture
def server_process():
    """`start(*args, command=None, env=None)` -> ServerProcess; every process it started is stopped afterwards."""
    procs: list[ServerProcess] = []

    def start(*args: str, command: Sequence[str] | None = None, env: dict | None = None) -> ServerProcess:
        procs.append(ServerProcess(args, command=command, env=env))
        return procs[-1]

    yield start
    for p in procs:
        p.stop()
