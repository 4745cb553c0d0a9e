"""Wall-clock to a target test accuracy on real MNIST, over several seeds.

Every run trains until `--target` (default 0.99) is reached or `--max-epochs`
pass, evaluating every `--eval-every` trained samples; times exclude data
loading and evaluation (`time_to_target_seconds`). Runs:

* `full`: full-data training, no scoring (the baseline);
* each strategy of `--strategies`, embedded (scored in the trainer's process) and
  remote (a `dataselect-server` on its own core, with the trainer's defaults:
  overlap on).

Every run is repeated for each of `--seeds` (default 0,1,2); the table gives
mean ± std over the seeds of the time to target, its ratio to full data (taken
per seed, then averaged), and the samples trained to target. A seed whose run
never reaches the target is counted apart ("reached n/N").

Reported per run: trainer seconds to target, its ratio to full data, and total
compute (trainer seconds + server compute seconds; for embedded runs the
scoring is already inside the trainer's seconds). Each finished run's summary
is kept in `--output`, and a rerun skips runs already there, so an interrupted
benchmark loses nothing.

    python benchmarks/time_to_accuracy.py --data-dir ../shared/datasets --seeds 0,1,2 --output tta/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine, mean_std, run_trainer, scoring_server  # noqa: E402

DEFAULT_STRATEGIES = "random,high_loss,selective_backprop,infobatch,high_gradient"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/datasets")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--model", default="cnn-small")
    ap.add_argument("--strategies", default=DEFAULT_STRATEGIES)
    ap.add_argument("--transports", default="embedded,remote")
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--max-epochs", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=6000)
    ap.add_argument("--select-fraction", type=float, default=0.5)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; every row is mean ± std over them")
    ap.add_argument("--lr", type=float, default=0.01,
                    help="SGD learning rate (the trainer's default 0.05 makes MNIST accuracy swing by ±0.3 points "
                         "between evaluations, too much to time a 99%% target)")
    ap.add_argument("--trainer-core", type=int, default=0)
    ap.add_argument("--server-core", type=int, default=1)
    ap.add_argument("--remote-args", default="",
                    help="extra dataselect-train options for the remote runs, e.g. \"--sync-every 4 "
                         "--checkpoint-dtype bfloat16\"; their results are kept apart (transport remote[...])")
    ap.add_argument("--output", default="tta-results")
    args = ap.parse_args()

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--model", args.model,
              "--epochs", str(args.max_epochs), "--eval-every", str(args.eval_every),
              "--target-accuracy", str(args.target), "--device", "cpu", "--lr", str(args.lr)]
    if args.train_subset:
        common += ["--train-subset", str(args.train_subset)]
    seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    strategies = [s for s in args.strategies.split(",") if s]
    remote_extra = args.remote_args.split()
    remote_name = f"remote[{' '.join(remote_extra)}]" if remote_extra else "remote"
    transports = [remote_name if t == "remote" else t for t in args.transports.split(",") if t]
    rows = [("full", "embedded", ["--select-fraction", "1"])]
    for strategy in strategies:
        for transport in transports:
            rows.append((strategy, transport, ["--strategy", strategy, "--select-fraction", str(args.select_fraction)]))
    plan = [(name, transport, seed, common + ["--seed", str(seed)] + extra)
            for seed in seeds for name, transport, extra in rows]

    summaries: dict[tuple[str, str, int], dict] = {}
    need_server = any(t.startswith("remote") for _, t, _, _ in plan)

    def run_all(address: str | None) -> None:
        for i, (name, transport, seed, cmd) in enumerate(plan, 1):
            path = out / _file_name(name, transport, seed)
            if path.is_file():
                summaries[(name, transport, seed)] = json.loads(path.read_text())
                continue
            if transport.startswith("remote"):
                cmd = cmd + ["--server", address] + remote_extra
            print(f"[{i}/{len(plan)}] running {name} ({transport}, seed {seed}) ...", file=sys.stderr, flush=True)
            summary = run_trainer(cmd, core=args.trainer_core)
            summary.pop("config", None)
            path.write_text(json.dumps(summary, indent=1))
            summaries[(name, transport, seed)] = summary
            print(f"  target {'reached' if summary['time_to_target_seconds'] else 'NOT reached'}"
                  f" at {summary['time_to_target_seconds']}s, accuracy {summary['test_accuracy']:.4f}",
                  file=sys.stderr, flush=True)

    if need_server and not all((out / _file_name(n, t, sd)).is_file() for n, t, sd, _ in plan):
        with scoring_server(args.server_core) as address:
            run_all(address)
    else:
        run_all(None)

    print(f"\nTime to {args.target:.1%} test accuracy on {args.dataset} ({args.model}, select fraction "
          f"{args.select_fraction}, lr {args.lr}, evaluated every {args.eval_every} samples, at most {args.max_epochs} "
          f"epochs, seeds {args.seeds}); {machine()}; remote = server on its own core, trainer defaults (overlap on)\n")
    print("| strategy | scorer | reached | trainer wall s to target | ratio to full data | total compute s "
          "(trainer + server) | samples trained to target | final acc |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, transport, _ in rows:
        times, ratios, totals, samples, finals = [], [], [], [], []
        for seed in seeds:
            s = summaries[(name, transport, seed)]
            full = summaries[("full", "embedded", seed)]["time_to_target_seconds"]
            finals.append(s["test_accuracy"])
            t = s["time_to_target_seconds"]
            if not t:
                continue
            server = s["server_compute_seconds"] if transport.startswith("remote") else 0.0
            # Compute spent up to the target: the server's share scales with the trainer's progress.
            frac = (t / s["training_wall_seconds"]) if s["training_wall_seconds"] else 1.0
            times.append(t)
            totals.append(t + server * frac)
            samples.append(s["samples_to_target"])
            if full:
                ratios.append(t / full)
        print(f"| {name} | {transport if name != 'full' else '-'} | {len(times)}/{len(seeds)} | {mean_std(times)} | "
              f"{mean_std(ratios, 2, 'x')} | {mean_std(totals)} | {mean_std(samples, 0)} | {mean_std(finals, 4)} |")


def _file_name(name: str, transport: str, seed: int) -> str:
    return f"{name}.{''.join(c if c.isalnum() or c in '-_' else '_' for c in transport)}.seed{seed}.json"


if __name__ == "__main__":
    main()
