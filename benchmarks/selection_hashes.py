"""Selection fingerprints: does a refactor leave every strategy's selections unchanged?

Runs `dataselect-train --no-overlap` on a fixed slice of real MNIST for a list of
strategies at a fixed seed and records each run's `selection_sha256` (a digest
of every trained sample id, in order) and its test accuracy. Run it before a
change with `--output before.json` and after it with `--compare before.json`:
strategies whose algorithm did not change must give the same digests.

    python benchmarks/selection_hashes.py --data-dir ../shared/datasets --output before.json
    python benchmarks/selection_hashes.py --data-dir ../shared/datasets --compare before.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

#: (label, extra dataselect-train arguments). Options pin warm-ups that would otherwise exceed 2 epochs.
RUNS = (
    ("full", ["--strategy", "random", "--select-fraction", "1.0"]),
    ("random", ["--strategy", "random"]),
    ("high_loss", ["--strategy", "high_loss"]),
    ("high_loss_class_balanced", ["--strategy", "high_loss", "--policy", "class_balanced"]),
    ("high_gradient", ["--strategy", "high_gradient"]),
    ("high_gradient_full", ["--strategy", "high_gradient", "-o", "scope=full"]),
    ("high_influence", ["--strategy", "high_influence"]),
    ("selective_backprop", ["--strategy", "selective_backprop"]),
    ("dynams", ["--strategy", "dynams"]),
    ("infobatch", ["--strategy", "infobatch"]),
    ("importance_sampling", ["--strategy", "importance_sampling", "-o", "warmup_epochs=1"]),
    ("mrmc", ["--strategy", "mrmc", "-o", "warmup_epochs=1"]),
    ("tracin", ["--strategy", "tracin"]),
    ("glister", ["--strategy", "glister"]),
    ("rho_loss", ["--strategy", "rho_loss"]),
    # DynaMS training its parameter-sharing proxy jointly (an auxiliary loss).
    ("dynams_psp", ["--strategy", "dynams", "-o", "proxy=psp"]),
)


def run(label: str, extra: list[str], args) -> dict:
    cmd = [sys.executable, "-m", "dataselect.client.cli", "--dataset", "mnist", "--data-dir", args.data_dir,
           "--train-subset", str(args.train_subset), "--test-subset", str(args.test_subset),
           "--epochs", str(args.epochs), "--seed", str(args.seed), "--device", "cpu", "--threads", "1",
           "--no-overlap", "--json", "-q", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    summary = json.loads(proc.stdout)
    return {"selection_sha256": summary["selection_sha256"], "test_accuracy": summary["test_accuracy"],
            "samples_trained": summary["samples_trained"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/datasets")
    ap.add_argument("--train-subset", type=int, default=4000)
    ap.add_argument("--test-subset", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    ap.add_argument("--output", default=None, help="write the fingerprints here (JSON)")
    ap.add_argument("--compare", default=None, help="compare with fingerprints written earlier")
    args = ap.parse_args()

    only = {s for s in args.only.split(",") if s}
    results = {}
    for label, extra in RUNS:
        if only and label not in only:
            continue
        results[label] = run(label, extra, args)
        print(f"{label:<26} {json.dumps(results[label])}", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        print("\nlabel                      same selections  accuracy before -> after")
        for label, now in results.items():
            old = before.get(label)
            if old is None or "error" in old or "error" in now:
                print(f"{label:<26} {'n/a':<16} {old} -> {now}")
                continue
            same = old["selection_sha256"] == now["selection_sha256"]
            print(f"{label:<26} {'yes' if same else 'NO':<16} {old['test_accuracy']:.4f} -> {now['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
