"""The scoring engine's speed options on this machine: precision, channels-last, compile, downscaled inputs.

    python benchmarks/bench_engine.py [--models cnn-small,cnn-deep] [--pool 2048] [--repeats 5] [--no-compile]

Each configuration scores the same pool of random uint8 28x28 images with
`high_loss` through `ScoringSession.select`; configurations are measured in
turn within each repeat (so machine load drifts over all of them), and the
table gives the median samples/s, the speed-up over the float32 contiguous
baseline, and how many of the baseline's selected samples each one also
selects. `compile` includes no compile time in the throughput (its first
calls are untimed); the compile time at session open is printed apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import median  # noqa: E402

CONFIGS = {
    "fp32, contiguous (baseline)": dict(precision="fp32", channels_last="off"),
    "fp32, channels-last": dict(precision="fp32", channels_last="on"),
    "bf16 autocast, contiguous": dict(precision="bf16", channels_last="off"),
    "bf16 autocast, channels-last": dict(precision="bf16", channels_last="on"),
    "compile, channels-last": dict(precision="fp32", channels_last="on", compile=True),
    "input_scale 0.5, channels-last": dict(precision="fp32", channels_last="on", input_scale=0.5),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn-small,cnn-deep")
    ap.add_argument("--pool", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile configuration")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)

    from dataselect.models import build_model
    from dataselect.scoring import PoolChunk, ScoringSession

    torch.set_num_threads(args.threads)
    kw = dict(num_classes=10, in_channels=1, image_size=28, mean=(0.1307,), std=(0.3081,))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.pool, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (args.pool,), generator=g)
    chunk = [PoolChunk(ids=torch.arange(args.pool), labels=y, inputs=x)]
    budget = args.pool // 2
    results = []
    for model in [m for m in args.models.split(",") if m]:
        torch.manual_seed(0)
        state = build_model(model, **kw).state_dict()
        sessions, notes = {}, {}
        for label, opts in CONFIGS.items():
            if opts.get("compile") and args.no_compile:
                continue
            t0 = time.perf_counter()
            try:
                s = ScoringSession("high_loss", {}, model, kw, num_classes=10, device="cpu", **opts)
            except Exception as exc:  # e.g. input_scale on cnn-small: the session refuses it
                notes[label] = f"refused: {str(exc).split(':')[0]}"
                continue
            s.load_state_dict(state, 1)
            s.select(chunk, budget)  # warm-up; for compile also the recompile for the real batch size
            if opts.get("compile"):
                notes[label] = f"compile + first calls {time.perf_counter() - t0:.1f}s" + (
                    "" if s.scoring_model.compiled is not None else " (fell back to eager)")
            sessions[label] = s
        times = {k: [] for k in sessions}
        picks = {}
        for _ in range(args.repeats):
            for label, s in sessions.items():
                t0 = time.perf_counter()
                res = s.select(chunk, budget)
                times[label].append(time.perf_counter() - t0)
                picks[label] = set(res.selected_ids.tolist())
        base = args.pool / median(times["fp32, contiguous (baseline)"])
        for label in CONFIGS:
            if label not in sessions:
                if label in notes:
                    results.append({"model": model, "config": label, "note": notes[label]})
                continue
            sps = args.pool / median(times[label])
            overlap = len(picks[label] & picks["fp32, contiguous (baseline)"]) / budget
            results.append({"model": model, "config": label, "samples_per_s": sps, "speedup": sps / base,
                            "overlap": overlap, "note": notes.get(label, "")})
        print(f"{model} done", file=sys.stderr)

    print(f"\nhigh_loss via ScoringSession.select, pool {args.pool:,} random 1x28x28 uint8 images, "
          f"{args.threads} torch thread(s), CPU, median of {args.repeats}\n")
    print("| model | configuration | samples/s | × baseline | same selection as baseline | note |")
    print("|---|---|---:|---:|---:|---|")
    for r in results:
        if "samples_per_s" not in r:
            print(f"| {r['model']} | {r['config']} | – | – | – | {r['note']} |")
            continue
        print(f"| {r['model']} | {r['config']} | {r['samples_per_s']:,.0f} | {r['speedup']:.2f} | "
              f"{100 * r['overlap']:.1f} % | {r['note']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
