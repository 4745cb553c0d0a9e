"""Does overlap cost the model? The product's defaults against fresh scoring, strategy x fraction x seed.

Every cell runs `dataselect-train` twice on real MNIST (30,000 training images,
1 epoch, cnn-small, lr 0.05, momentum 0.9, batch 64, one thread):

* `default`: `--server HOST:PORT` and nothing else, so overlap is on and the
  session ramps its selection in (the defaults a user gets);
* `fresh`: in-process with `--no-overlap`, every pool scored with the current
  weights (the same selections a server gives with `--no-overlap`).

The table gives the mean ± std over seeds of the test accuracy of each, their
difference in points, the samples trained (the ramp trains on more early on),
the share of scoring the trainer did not wait for, the most of it that could be hidden, and the
staleness. The background worker pushes the weights and scores each pool in turn, so per run the
trainer cannot avoid waiting for whatever the worker's push (P) and Select (S) time exceed its
training time (T): at most min(1, (T - P) / S) of the Select time can be hidden. Each
run's summary is kept under --output and a rerun skips the runs already there.

    python benchmarks/overlap_table.py --data-dir ../shared/datasets --output docs/results/overlap_table
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine, mean_std, run_trainer, scoring_server  # noqa: E402

STRATEGIES = "high_loss,high_gradient,high_influence,selective_backprop"
FRACTIONS = "0.1,0.25,0.33,0.5"


def hideable(summary: dict) -> float:
    """The most of the Select time the trainer could have not waited for: min(1, (T - P) / S)."""
    select = summary.get("background_score_seconds") or 0.0
    if select <= 0:
        return 0.0
    spare = summary["train_seconds"] - (summary.get("background_checkpoint_seconds") or 0.0)
    return max(0.0, min(1.0, spare / select))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/datasets")
    ap.add_argument("--strategies", default=STRATEGIES)
    ap.add_argument("--fractions", default=FRACTIONS)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--train-subset", type=int, default=30000)
    ap.add_argument("--kinds", default="fresh,default", help="fresh (in-process, --no-overlap) and/or default "
                    "(--server, the defaults: overlap on)")
    ap.add_argument("--extra", default="", help="more dataselect-train options for every run")
    ap.add_argument("--trainer-core", type=int, default=0)
    ap.add_argument("--server-core", type=int, default=1)
    ap.add_argument("--output", default="overlap-table")
    args = ap.parse_args()

    out = Path(args.output)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    strategies = [s for s in args.strategies.split(",") if s]
    fractions = [float(f) for f in args.fractions.split(",") if f]
    seeds = [int(v) for v in args.seeds.split(",") if v]
    kinds = [k for k in args.kinds.split(",") if k]
    common = ["--dataset", "mnist", "--data-dir", args.data_dir, "--train-subset", str(args.train_subset),
              "--epochs", "1", "--device", "cpu", *args.extra.split()]
    plan = [(st, f, seed, kind) for st in strategies for f in fractions for seed in seeds for kind in kinds]
    done: dict[tuple, dict] = {}

    def run_all(address: str | None) -> None:
        for i, (st, f, seed, kind) in enumerate(plan, 1):
            path = out / "runs" / f"{st}.f{f}.seed{seed}.{kind}.json"
            if path.is_file():
                done[(st, f, seed, kind)] = json.loads(path.read_text())
                continue
            cmd = common + ["--strategy", st, "--select-fraction", str(f), "--seed", str(seed)]
            cmd += ["--server", address] if kind == "default" else ["--no-overlap"]
            print(f"[{i}/{len(plan)}] {st} f={f} seed {seed} {kind} ...", file=sys.stderr, flush=True)
            summary = run_trainer(cmd, core=args.trainer_core)
            summary.pop("config", None)
            summary.pop("per_epoch", None)
            path.write_text(json.dumps(summary, indent=1))
            done[(st, f, seed, kind)] = summary
            print(f"  accuracy {summary['test_accuracy']:.4f}", file=sys.stderr, flush=True)

    if "default" in kinds and not all((out / "runs" / f"{st}.f{f}.seed{sd}.{k}.json").is_file()
                                      for st, f, sd, k in plan):
        with scoring_server(args.server_core) as address:
            run_all(address)
    else:
        run_all(None)

    lines = [f"`python benchmarks/overlap_table.py {shlex.join(sys.argv[1:])}`", "",
             f"MNIST {args.train_subset} training images, 1 epoch, cnn-small, seeds {args.seeds}; {machine()}. "
             "default = `--server` with the trainer's defaults (overlap on, ramp of 25 / fraction steps); "
             "fresh = in-process, `--no-overlap`.", "",
             "| strategy | fraction | fresh acc | default acc | difference (points) | samples trained fresh / default "
             "| scoring hidden (default) | hideable at most | staleness mean (max) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for st in strategies:
        for f in fractions:
            row = {k: [done[(st, f, sd, k)] for sd in seeds if (st, f, sd, k) in done] for k in kinds}
            acc = {k: [s["test_accuracy"] for s in v] for k, v in row.items()}
            diff = ([100 * (a - b) for a, b in zip(acc["default"], acc["fresh"])]
                    if "default" in acc and "fresh" in acc else [])
            trained = " / ".join(mean_std([s["samples_trained"] for s in row.get(k, [])], 0) for k in ("fresh", "default"))
            dflt = row.get("default", [])
            hidden = mean_std([100 * s["hidden_score_fraction"] for s in dflt], 1, "%")
            bound = mean_std([100 * hideable(s) for s in dflt], 1, "%")
            stale = (f"{statistics.fmean(s['staleness_mean_steps'] for s in dflt):.2f} "
                     f"({max(s['staleness_max_steps'] for s in dflt)})") if dflt else "—"
            lines.append(f"| {st} | {f:g} | {mean_std(acc.get('fresh', []), 4)} | {mean_std(acc.get('default', []), 4)} | "
                         f"{mean_std(diff, 2)} | {trained} | {hidden} | {bound} | {stale} |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
