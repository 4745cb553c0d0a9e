"""Shared plumbing for the end-to-end benchmarks: a pinned scoring server and pinned trainer runs.

On a CPU box the server and the trainer each get their own core (`taskset`-style
affinity via `os.sched_setaffinity` in the child) and one torch thread, so a
remote run measures what a separate scoring device buys.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent


def _pinned(core: int | None):
    """A preexec function: pin the child to `core` (when it exists here) and, on Linux, have it
    killed when the benchmark dies, so an interrupted benchmark leaves no server behind."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_setaffinity") else set()

    def setup() -> None:
        if core is not None and core in cores:
            os.sched_setaffinity(0, {core})
        if sys.platform.startswith("linux"):
            import ctypes
            import signal

            ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return setup


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


@dataclass
class Server:
    address: str
    pid: int


@contextmanager
def server_process(*extra: str, threads: int = 1, core: int | None = None) -> Iterator[Server]:
    """`dataselect-server --device cpu --port 0 --threads N ...extra` (pinned to `core`); stopped on exit."""
    script = BIN / "dataselect-server"
    cmd = ([str(script)] if script.exists() else [sys.executable, "-m", "dataselect.server.cli"]) + [
        "--device", "cpu", "--port", "0", "--threads", str(threads), "--log-level", "warning", *extra]
    env = dict(_env(), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_pinned(core))
        try:
            deadline = time.monotonic() + 120
            while True:
                match = re.search(r"^listening on (\S+)$", Path(log.name).read_text(), re.M)
                if match:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dataselect-server did not start:\n{Path(log.name).read_text()}")
                time.sleep(0.1)
            yield Server(match.group(1), proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def scoring_server(core: int | None = None, *extra: str) -> Iterator[str]:
    """A one-thread CPU server pinned to `core`; yields its HOST:PORT."""
    with server_process(*extra, core=core) as server:
        yield server.address


def memory_mib(pid: int, field: str = "VmHWM") -> float:
    """A /proc/PID/status memory figure in MiB: VmHWM (peak resident set) or VmRSS (now)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_trainer(args: list[str], core: int | None = None, timeout: float = 3600) -> dict:
    """Run `dataselect-train ... --json -q` (pinned to `core`, one thread) and return its summary."""
    cmd = [str(BIN / "dataselect-train"), *args, "--threads", "1", "--json", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), preexec_fn=_pinned(core),
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} CPU cores available, torch threads 1 per process"


def mean_std(values: list[float], digits: int = 2, suffix: str = "") -> str:
    """"mean ± std" (sample std) of `values` for a table; the value alone when there is one; a dash when none."""
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}{suffix}"
    return f"{mean:.{digits}f}{suffix} ± {statistics.stdev(values):.{digits}f}"
