"""Scoring throughput per strategy vs a plain inference_mode forward of the same model and batch.

    python benchmarks/bench_scoring.py [--model cnn-small] [--pool 2048] [--output out.json]

Each strategy scores the same pool through `ScoringSession.select` (signals
engine + strategy + contract check); the reference is `model(x)` under
`torch.inference_mode()` in the same micro-batches. Ratio = strategy
samples/s ÷ forward samples/s (1.0 = free on top of a forward).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dataselect.engine import prepare_inputs, resolve_channels_last, resolve_device, resolve_precision, synchronize
from dataselect.models import build_model
from dataselect.plugins.base import Progress
from dataselect.scoring import PoolChunk, ScoringSession

CASES = [
    ("random", {}), ("high_loss", {}), ("high_gradient", {"scope": "last_layer"}), ("high_gradient", {"scope": "full"}),
    ("high_influence", {}), ("dynams", {}), ("dynams", {"kind": "logit"}),
    # The parameter-sharing proxy, with its agreement check (a full forward of 512 samples) and without it.
    ("dynams", {"proxy": "psp"}), ("dynams", {"proxy": "psp", "agreement_sample": 0}), ("mrmc", {}),
    ("importance_sampling", {}), ("selective_backprop", {}), ("infobatch", {}),
]
TARGETS = {"high_loss": 0.85, "dynams": 0.85, "high_gradient scope=last_layer": 0.85,
           "high_influence": 0.3, "high_gradient scope=full": 0.1}
SHAPES = {"cnn-small": (1, 28), "cnn-deep": (1, 28), "mlp": (1, 28), "resnet18": (3, 32)}


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn-small", choices=sorted(SHAPES))
    ap.add_argument("--pool", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default="", help="comma list of strategy names")
    ap.add_argument("--output", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    channels, size = SHAPES[args.model]
    kw = dict(num_classes=10, in_channels=channels, image_size=size, mean=(0.5,) * channels, std=(0.25,) * channels)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (args.pool, channels, size, size), dtype=torch.uint8)
    y = torch.randint(0, 10, (args.pool,))
    ids = torch.arange(args.pool)
    state = build_model(args.model, **kw).state_dict()

    ref = build_model(args.model, **kw).to(device).eval()
    # The reference uses the memory format and precision the sessions score in by default
    # (channels-last on CPU and CUDA; bf16 autocast on CUDA), so the ratio measures the
    # strategy's overhead, not the engine options' speed-up.
    channels_last = resolve_channels_last("auto", device)
    autocast_dtype = resolve_precision("auto", device)
    if channels_last:
        ref = ref.to(memory_format=torch.channels_last)

    def forward():
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                    enabled=autocast_dtype is not None):
            for i in range(0, args.pool, args.micro_batch):
                ref(prepare_inputs(x[i:i + args.micro_batch].to(device), channels_last=channels_last))
        synchronize(device)

    fwd = args.pool / best_of(forward, args.repeats)
    rows = []
    only = {s for s in args.only.split(",") if s}
    for name, opts in CASES:
        if only and name not in only:
            continue
        label = name + "".join(f" {k}={v}" for k, v in opts.items())
        s = ScoringSession(name, opts, args.model, kw, num_classes=10, device=device, micro_batch=args.micro_batch)
        s.load_state_dict(state, 1)
        if s.strategy_object.uses_reports:  # give report-driven strategies their history (not timed)
            for e in range(3):
                s.report(ids, torch.rand(args.pool), None, None, Progress(epoch=e, total_epochs=10))
        progress = Progress(epoch=3, total_epochs=10)
        chunk = [PoolChunk(ids=ids, labels=y, inputs=x)]
        secs = best_of(lambda: s.select(chunk, args.pool // 4, progress=progress), args.repeats)
        sps = args.pool / secs
        # The reference is re-measured next to each strategy: on a shared machine
        # load drifts, and a ratio against a stale forward time would be wrong.
        local_fwd = args.pool / best_of(forward, args.repeats)
        rows.append({"strategy": label, "samples_per_s": sps, "forward_samples_per_s": local_fwd,
                     "ratio": sps / local_fwd, "target": TARGETS.get(label)})
        s.close()

    print(f"model {args.model}, pool {args.pool}, micro-batch {args.micro_batch}, device {device}, "
          f"threads {torch.get_num_threads()}; plain forward {fwd:,.0f} samples/s\n")
    print("| strategy | samples/s | forward samples/s (same moment) | × forward | target |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        t = "" if r["target"] is None else f"≥ {r['target']} {'ok' if r['ratio'] >= r['target'] else 'MISSED'}"
        print(f"| {r['strategy']} | {r['samples_per_s']:,.0f} | {r['forward_samples_per_s']:,.0f} | {r['ratio']:.2f} | {t} |")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump({"model": args.model, "pool": args.pool, "micro_batch": args.micro_batch, "device": str(device),
                       "forward_samples_per_s": fwd, "results": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
