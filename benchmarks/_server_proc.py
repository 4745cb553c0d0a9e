"""A `dataselect-server` subprocess whose process id the benchmark can read memory figures from."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent


@dataclass
class Server:
    address: str
    pid: int


@contextmanager
def server_process(*extra: str, threads: int = 1) -> Iterator[Server]:
    """`dataselect-server --device cpu --port 0 --threads N ...extra`; stopped (SIGTERM) on exit."""
    script = BIN / "dataselect-server"
    cmd = ([str(script)] if script.exists() else [sys.executable, "-m", "dataselect.server.cli"]) + [
        "--device", "cpu", "--port", "0", "--threads", str(threads), "--log-level", "warning", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
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


def memory_mib(pid: int, field: str = "VmHWM") -> float:
    """A /proc/PID/status memory figure in MiB: VmHWM (peak resident set) or VmRSS (now)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])
