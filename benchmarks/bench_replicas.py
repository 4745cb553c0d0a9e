"""Scoring throughput with 1 and 2 (or more) scoring-server replicas (a benchmark, not a unit test).

    python benchmarks/bench_replicas.py                       # 1 and 2 replicas, high_loss, cnn-small
    python benchmarks/bench_replicas.py --replicas 1,2,4 --pool 8192 --json out.json

It starts as many `dataselect-server --device cpu` processes as the largest
count, replica k pinned to CPU core k (`os.sched_setaffinity`) and held to one
torch thread (`--threads 1` / OMP_NUM_THREADS=1); for each count n it opens a
`ReplicatedScorer` over the first n (what `dataselect-train --server a,b`
uses), pushes a checkpoint, and times `--repeats` Selects of `--pool`
MNIST-sized uint8 samples with budget `pool × --fraction`, the counts taking
turns Select by Select so that other load on the machine falls on all alike. Throughput = samples scored per second of wall clock,
measured at the client (sharding, transfer, the replicas' scoring in parallel,
merging and the global top-k). The client itself is not pinned: on a machine
with as many cores as replicas it shares them with the replicas.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import BIN, scoring_server  # noqa: E402  (pinned CPU server subprocess)

def _supports_threads() -> bool:
    out = subprocess.run([str(BIN / "dataselect-server"), "--help"], capture_output=True, text=True).stdout
    return "--threads" in out


def measure(counts: list[int], args, threads_flag: bool) -> list[dict]:
    """Start max(counts) pinned servers once; one ReplicatedScorer per count over the first n of them;
    timed Selects interleaved round-robin between the counts, so load from anything else on the
    machine falls on every count alike."""
    from dataselect.client.replicas import ReplicatedScorer
    from dataselect.client.scorer import SessionSpec
    from dataselect.models import build_model
    from dataselect.plugins.base import Progress

    kwargs = dict(num_classes=10, in_channels=1, image_size=28, mean=(0.1307,), std=(0.3081,))
    spec = SessionSpec(args.strategy, {}, args.model, kwargs, num_classes=10, dataset="bench", dataset_size=60_000)
    torch.manual_seed(0)
    model = build_model(args.model, **kwargs)
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 256, (args.pool, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.pool,), generator=g)
    budget = max(1, round(args.pool * args.fraction))
    cores = sorted(os.sched_getaffinity(0))
    with ExitStack() as stack:
        extra = ["--log-level", "warning", *(["--threads", "1"] if threads_flag else [])]
        addresses = [stack.enter_context(scoring_server(cores[k % len(cores)] if args.pin else None, *extra))
                     for k in range(max(counts))]
        scorers = {n: stack.enter_context(ReplicatedScorer(addresses[:n], spec, timeout=600)) for n in counts}
        times: dict[int, list[float]] = {n: [] for n in counts}
        step = 0
        for n, scorer in scorers.items():
            scorer.push_checkpoint(model, 1, 0)
        for r in range(args.warmup + args.repeats):
            for n, scorer in scorers.items():
                ids = torch.arange(step * args.pool, (step + 1) * args.pool)  # fresh ids, as in training
                step += 1
                t0 = time.perf_counter()
                scorer.select(ids, inputs, labels, budget, Progress())
                if r >= args.warmup:
                    times[n].append(time.perf_counter() - t0)
        counters = {n: dict(s.counters.extra) for n, s in scorers.items()}
    rows = []
    for n in counts:
        total = sum(times[n])
        rows.append({"replicas": n, "pool": args.pool, "budget": budget, "repeats": args.repeats,
                     "seconds": total, "samples_per_second": args.pool * args.repeats / total,
                     "median_select_seconds": sorted(times[n])[len(times[n]) // 2],
                     "per_replica_samples": {k: v for k, v in counters[n].items() if k.endswith("_samples_scored")}})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", default="1,2", help="comma-separated replica counts to measure")
    ap.add_argument("--pool", type=int, default=4096, help="samples per Select")
    ap.add_argument("--fraction", type=float, default=0.5, help="budget = pool x fraction")
    ap.add_argument("--repeats", type=int, default=8, help="timed Selects per replica count")
    ap.add_argument("--warmup", type=int, default=2, help="untimed Selects first")
    ap.add_argument("--model", default="cnn-small")
    ap.add_argument("--strategy", default="high_loss")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin replica k to core k")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.replicas.split(",")]
    threads_flag = _supports_threads()
    rows = measure(counts, args, threads_flag)
    base = rows[0]["samples_per_second"]
    print(f"{args.strategy}, {args.model}, pool {args.pool}, budget {rows[0]['budget']}, {args.repeats} Selects each; "
          f"{os.cpu_count()} CPU(s), torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'replicas':>8} {'samples/s':>11} {'median Select s':>16} {'× 1 replica':>12}")
    for r in rows:
        r["ratio"] = r["samples_per_second"] / base
        print(f"{r['replicas']:>8} {r['samples_per_second']:>11,.0f} {r['median_select_seconds']:>16.3f} {r['ratio']:>11.2f}×")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cpus": os.cpu_count(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
