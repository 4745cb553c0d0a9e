"""Scoring cost against pool size and model depth, through the streamed whole-set path.

    python benchmarks/bench_scaling.py --data-dir ../shared/datasets
    python benchmarks/bench_scaling.py --data-dir DIR --sizes 1000,4000 --models cnn-small --repeats 1

For every model and pool size a fresh `dataselect-server --device cpu
--threads N --max-message-mb M` subprocess is started, a session opened and a
checkpoint uploaded, and `RemoteScorer.select` scores the first SIZE real
MNIST training images and selects half of them. Pools larger than half of
`--max-message-mb` travel as a SelectStream of chunks (as a subset-mode
trainer sends the whole training set), which the server scores chunk by chunk.

Reported per row: the server's scoring compute seconds (median of
`--repeats`, after an untimed warm-up Select of 256 samples), seconds per
1,000 samples (flat = linear growth), and the server's resident memory: VmRSS
after the warm-up and the peak VmHWM after the last Select (flat across sizes = streaming keeps memory bounded). Models:
cnn-small and cnn-deep with depth 4/6/9 conv layers; `--grad-sizes` adds a
gradient strategy (high_gradient scope=full, per-sample gradients) on
cnn-small at small sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import median, memory_mib, server_process  # noqa: E402

MODELS = {"cnn-small": ("cnn-small", {}), "cnn-deep-4": ("cnn-deep", {"depth": 4}),
          "cnn-deep-6": ("cnn-deep", {"depth": 6}), "cnn-deep-9": ("cnn-deep", {"depth": 9})}


def _ints(text: str) -> list[int]:
    return [int(float(t)) for t in text.split(",") if t.strip()]


def measure(args, data, label: str, strategy: str, options: dict, size: int) -> dict:
    from dataselect.client.remote import RemoteScorer
    from dataselect.client.scorer import SessionSpec
    from dataselect.models import build_model
    from dataselect.plugins.base import Progress

    name, extra = MODELS[label]
    kwargs = {**data.info.model_kwargs(), **extra}
    spec = SessionSpec(strategy, options, name, kwargs, num_classes=data.info.num_classes, seed=0,
                       dataset="mnist", dataset_size=len(data.train_tensors))
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    ids, x, y = data.train_tensors.ids[:size], data.train_tensors.inputs[:size], data.train_tensors.labels[:size]
    limit = args.max_message_mb * 2**20
    with server_process("--max-message-mb", str(args.max_message_mb), threads=args.threads) as server, \
            RemoteScorer(server.address, spec, retry_seconds=0, max_message_bytes=limit, timeout=3600) as remote:
        remote.push_checkpoint(model, 1, 0)
        warm = min(size, 256)  # first-call costs (allocator, kernels) are not what grows with the pool
        remote.select(ids[:warm], x[:warm], y[:warm], warm // 2, Progress())
        rss_before = memory_mib(server.pid, "VmRSS")
        compute, wall = [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            reply = remote.select(ids, x, y, size // 2, Progress(epoch=r, total_epochs=args.repeats))
            wall.append(time.perf_counter() - t0)
            compute.append(reply.server_compute_seconds)
        peak = memory_mib(server.pid, "VmHWM")
    streamed = size * (x[0].numel() + 16) > limit // 2
    row = {"model": label, "strategy": strategy + "".join(f" {k}={v}" for k, v in options.items()), "pool": size,
           "streamed": streamed, "compute_seconds": median(compute), "wall_seconds": median(wall),
           "seconds_per_1k": 1000 * median(compute) / size, "rss_before_mib": rss_before, "peak_rss_mib": peak}
    print(f"{row['model']:<11} {row['strategy']:<26} {size:>6}: {row['compute_seconds']:.2f}s "
          f"({row['seconds_per_1k']:.3f} s/1k), RSS {rss_before:.0f} -> peak {peak:.0f} MiB", file=sys.stderr)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="folder holding MNIST (default: $DATASELECT_DATA or the cache)")
    ap.add_argument("--sizes", default="1000,4000,16000,60000")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--strategy", default="high_loss")
    ap.add_argument("--grad-sizes", default="1000,4000", help="pool sizes for high_gradient scope=full ('' = none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    ap.add_argument("--max-message-mb", type=int, default=4, help="server and client message limit")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)

    from dataselect.datasets import open_dataset

    sizes = _ints(args.sizes)
    data = open_dataset("mnist", args.data_dir, download=False, train_subset=max(sizes + _ints(args.grad_sizes)))
    rows = []
    for label in [m for m in args.models.split(",") if m]:
        if label not in MODELS:
            raise SystemExit(f"unknown model {label!r}; use {', '.join(MODELS)}")
        for size in sizes:
            rows.append(measure(args, data, label, args.strategy, {}, size))
    for size in _ints(args.grad_sizes):
        rows.append(measure(args, data, "cnn-small", "high_gradient", {"scope": "full"}, size))

    print(f"\nServer: dataselect-server --device cpu --threads {args.threads} --max-message-mb {args.max_message_mb} "
          f"(a fresh process per row); pools of real MNIST images, half selected; median of {args.repeats}.\n")
    print("| model | strategy | pool | streamed | compute s | s / 1k samples | RSS before MiB | peak RSS MiB |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['strategy']} | {r['pool']:,} | {'yes' if r['streamed'] else 'no'} | "
              f"{r['compute_seconds']:.2f} | {r['seconds_per_1k']:.3f} | {r['rss_before_mib']:.0f} | "
              f"{r['peak_rss_mib']:.0f} |")
    print("\nGrowth per model (largest pool vs smallest): time ratio / size ratio (1.0 = linear), peak RSS change")
    for key in dict.fromkeys((r["model"], r["strategy"]) for r in rows):
        group = [r for r in rows if (r["model"], r["strategy"]) == key]
        if len(group) < 2:
            continue
        lo, hi = group[0], group[-1]
        print(f"* {key[0]} {key[1]}: {lo['pool']:,} -> {hi['pool']:,} samples: time x"
              f"{hi['compute_seconds'] / lo['compute_seconds']:.1f} for size x{hi['pool'] / lo['pool']:.0f} "
              f"({(hi['seconds_per_1k'] / lo['seconds_per_1k']):.2f} of linear); peak RSS "
              f"{lo['peak_rss_mib']:.0f} -> {hi['peak_rss_mib']:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
