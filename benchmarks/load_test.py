"""Load test: many concurrent trainers against one CPU `dataselect-server` (a benchmark, not a unit test).

    python benchmarks/load_test.py                      # 16 clients x 100 Selects of 1,024 MNIST-sized samples
    python benchmarks/load_test.py --clients 4 --requests 10 --json out.json
    python benchmarks/load_test.py --memory-variants      # the same load against four memory settings

Starts the server as a subprocess (`--device cpu`), opens one high_loss session
per client (cnn-small, 1x28x28 uint8 inputs), uploads a checkpoint, then each
client sends `--requests` Selects of `--pool` samples and closes its session.
Reports errors, p50/p99 latency, throughput and the server's RSS (VmRSS) before
the load and once every session has closed, and their ratio.

`--memory-variants` runs the load once per server memory setting, one after the
other in the same run: glibc's defaults with nothing handed back (the baseline),
`malloc_trim` after sessions close, that plus malloc arenas capped at 2, a fixed
1 MiB mmap threshold alone, and all three (the server's default). The ratio
RSS after / RSS before says how much memory came back; RssAnon and RssFile split
it into heap and mapped files (the parts of libtorch scoring touched, which no
trim gives back).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures

import torch


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A /proc/PID/status figure in MiB: VmRSS (resident), RssAnon (heap, stacks) or RssFile (mapped files,
    e.g. the parts of libtorch that scoring has touched: not memory a trim can give back)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


#: --memory-variants: name -> extra server arguments.
MEMORY_VARIANTS = {
    "baseline: glibc defaults, no trim": ["--no-trim-memory", "--malloc-arena-max", "0", "--malloc-mmap-threshold-kb", "0"],
    "malloc_trim": ["--trim-memory", "--malloc-arena-max", "0", "--malloc-mmap-threshold-kb", "0"],
    "malloc_trim + 2 arenas": ["--trim-memory", "--malloc-arena-max", "2", "--malloc-mmap-threshold-kb", "0"],
    "fixed 1 MiB mmap threshold": ["--no-trim-memory", "--malloc-arena-max", "0", "--malloc-mmap-threshold-kb", "1024"],
    "all three (the server's default)": ["--trim-memory", "--malloc-arena-max", "2", "--malloc-mmap-threshold-kb", "1024"],
}
#: How long to wait after the last session closed before reading RSS (the server trims within ~0.2 s).
SETTLE_SECONDS = 2.0


def start_server(args, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    script = shutil.which("dataselect-server", path=os.path.dirname(sys.executable))
    cmd = ([script] if script else [sys.executable, "-m", "dataselect.server.cli"]) + [
        "--device", "cpu", "--port", "0", "--workers", str(args.workers), "--max-queue", str(args.max_queue),
        "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"server exited with {proc.wait()}")
        match = re.match(r"listening on (\S+:\d+)$", line.strip())
        if match:
            return proc, match.group(1)
    raise SystemExit("server did not start")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=100, help="Selects per client")
    ap.add_argument("--pool", type=int, default=1024, help="samples per Select")
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--model", default="cnn-small")
    ap.add_argument("--strategy", default="high_loss")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="server --workers")
    ap.add_argument("--max-queue", type=int, default=64, help="server --max-queue")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--memory-variants", action="store_true",
                    help="run the load once per server memory setting and compare RSS after/before")
    ap.add_argument("--server-args", default="", help="extra dataselect-server arguments (one string)")
    args = ap.parse_args(argv)
    variants = MEMORY_VARIANTS if args.memory_variants else {"server": args.server_args.split()}
    results = [run_load(args, name, extra) for name, extra in variants.items()]
    print("| server | clients x requests | pool | errors | p50 ms | p99 ms | Selects/s | samples/s "
          "| RSS before load (MiB) | RSS after, sessions closed (MiB) | after / before "
          "| of which anon before -> after | file-backed before -> after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['server']} | {r['clients']} x {r['requests_per_client']} | {r['pool']} | {r['errors']} | "
              f"{r['p50_ms'] or 0:.1f} | {r['p99_ms'] or 0:.1f} | {r['throughput_selects_per_s']:.1f} | "
              f"{r['throughput_samples_per_s']:.0f} | {r['server_rss_before_mib']:.0f} | "
              f"{r['server_rss_after_mib']:.0f} | {r['rss_after_over_before']:.2f} | "
              f"{r['server_rss_anon_before_mib']:.0f} -> {r['server_rss_anon_after_mib']:.0f} | "
              f"{r['server_rss_file_before_mib']:.0f} -> {r['server_rss_file_after_mib']:.0f} |")
        for e in r["first_errors"]:
            print("error:", e)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results if len(results) > 1 else results[0], f, indent=2)
    return 1 if any(r["errors"] for r in results) else 0


def run_load(args, name: str, extra: list[str]) -> dict:

    from dataselect.client.remote import RemoteScorer
    from dataselect.client.scorer import SessionSpec
    from dataselect.models import build_model
    from dataselect.plugins.base import Progress

    kwargs = dict(num_classes=10, in_channels=1, image_size=28, mean=(0.1307,), std=(0.3081,))
    spec = SessionSpec(args.strategy, {}, args.model, kwargs, num_classes=10, dataset="load", dataset_size=60_000)
    torch.manual_seed(0)
    model = build_model(args.model, **kwargs)
    proc, address = start_server(args, extra)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    try:
        rss_before = rss_mib(proc.pid)
        anon_before, file_before = rss_mib(proc.pid, "RssAnon"), rss_mib(proc.pid, "RssFile")

        def client(c: int) -> None:
            g = torch.Generator().manual_seed(c)
            with RemoteScorer(address, spec, timeout=300, retry_seconds=0) as remote:
                remote.push_checkpoint(model, version=1, step=0)
                for r in range(args.requests):
                    ids = torch.randint(0, 60_000, (args.pool,), generator=g).unique()
                    while ids.numel() < args.pool:  # unique ids, exactly --pool of them
                        ids = torch.cat([ids, torch.randint(0, 60_000, (args.pool,), generator=g)]).unique()[:args.pool]
                    inputs = torch.randint(0, 256, (args.pool, 1, 28, 28), dtype=torch.uint8, generator=g)
                    labels = torch.randint(0, 10, (args.pool,), generator=g)
                    t0 = time.perf_counter()
                    try:
                        remote.select(ids, inputs, labels, args.budget, Progress(step=r))
                    except Exception as exc:  # noqa: BLE001 - counted, not fatal
                        with lock:
                            errors.append(f"{type(exc).__name__}: {exc}")
                        continue
                    with lock:
                        latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        with futures.ThreadPoolExecutor(args.clients) as ex:
            for f in [ex.submit(client, c) for c in range(args.clients)]:
                try:
                    f.result()
                except Exception as exc:  # noqa: BLE001 - a client that could not even open
                    errors.append(f"{type(exc).__name__}: {exc}")
        wall = time.perf_counter() - t0
        time.sleep(SETTLE_SECONDS)  # every client closed its session on leaving its `with`
        rss_after = rss_mib(proc.pid)
        anon_after, file_after = rss_mib(proc.pid, "RssAnon"), rss_mib(proc.pid, "RssFile")
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    lat = sorted(latencies)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else lat * 99
    result = {
        "clients": args.clients, "requests_per_client": args.requests, "pool": args.pool, "budget": args.budget,
        "model": args.model, "strategy": args.strategy, "server_workers": args.workers, "cpus": os.cpu_count(),
        "selects_ok": len(lat), "errors": len(errors), "first_errors": errors[:5],
        "p50_ms": 1000 * q[49] if lat else None, "p99_ms": 1000 * q[98] if lat else None,
        "wall_s": wall, "throughput_selects_per_s": len(lat) / wall,
        "throughput_samples_per_s": len(lat) * args.pool / wall,
        "server_rss_before_mib": rss_before, "server_rss_after_mib": rss_after,
        "rss_after_over_before": rss_after / rss_before, "server": name, "server_args": list(extra),
        "server_rss_anon_before_mib": anon_before, "server_rss_anon_after_mib": anon_after,
        "server_rss_file_before_mib": file_before, "server_rss_file_after_mib": file_after,
    }
    return result


if __name__ == "__main__":
    sys.exit(main())
