"""Does overlapped scoring take selection off the trainer's critical path?

Compares the trainer's wall-clock (less data loading and evaluation:
`training_wall_seconds`) of

* `overlap`:  high_loss with a remote server and `--overlap` (server on its own core);
* `inline`:   the same with `--no-overlap` (the trainer waits for every Select);
* `embedded`: the same scored in the trainer's own process;
* `train-only`: no scoring at all, training on the same number of samples
  (`--select-fraction 1 --budget-samples N`, N = what the overlapped run trained on),

and prints each as a ratio to train-only (target for `overlap`: <= 1.15x).

    python benchmarks/bench_overlap.py --data-dir ../shared/datasets --train-subset 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine, median, run_trainer, scoring_server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/datasets")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--model", default="cnn-small")
    ap.add_argument("--strategy", default="high_loss")
    ap.add_argument("--train-subset", type=int, default=20000)
    ap.add_argument("--sync-every", type=int, default=1)
    ap.add_argument("--checkpoint-dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trainer-core", type=int, default=0)
    ap.add_argument("--server-core", type=int, default=1)
    args = ap.parse_args()

    common = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--model", args.model,
              "--train-subset", str(args.train_subset), "--test-subset", "1000", "--epochs", "1",
              "--device", "cpu"]
    select = common + ["--strategy", args.strategy, "--sync-every", str(args.sync_every)]
    results: dict[str, list[dict]] = {k: [] for k in ("overlap", "inline", "embedded", "train-only")}
    with scoring_server(args.server_core) as address:
        remote = select + ["--server", address, "--checkpoint-dtype", args.checkpoint_dtype]
        for r in range(args.repeats):
            over = run_trainer(remote + ["--overlap"], core=args.trainer_core)
            results["overlap"].append(over)
            results["inline"].append(run_trainer(remote + ["--no-overlap"], core=args.trainer_core))
            results["embedded"].append(run_trainer(select, core=args.trainer_core))
            results["train-only"].append(run_trainer(
                common + ["--select-fraction", "1", "--budget-samples", str(over["samples_trained"])],
                core=args.trainer_core))
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{k} {v[-1]['training_wall_seconds']:.1f}s" for k, v in results.items()), file=sys.stderr)

    base = median([s["training_wall_seconds"] for s in results["train-only"]])
    print(f"\n{args.strategy} on {args.dataset} ({args.model}, {args.train_subset} training samples, 1 epoch, "
          f"--sync-every {args.sync_every}, checkpoints {args.checkpoint_dtype}); {machine()}; "
          f"trainer on core {args.trainer_core}, server on core {args.server_core}; median of {args.repeats}\n")
    print("| run | trainer wall s | ratio to train-only | train s | score wait s | server compute s "
          "| hidden score fraction | staleness max/mean | samples trained | test acc |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        def m(key: str) -> float:
            return median([float(s[key]) for s in runs])

        print(f"| {name} | {m('training_wall_seconds'):.2f} | {m('training_wall_seconds') / base:.2f}x "
              f"| {m('train_seconds'):.2f} | {m('score_seconds'):.2f} | {m('server_compute_seconds'):.2f} "
              f"| {m('hidden_score_fraction'):.2f} | {m('staleness_max_steps'):.0f}/{m('staleness_mean_steps'):.2f} "
              f"| {m('samples_trained'):.0f} | {m('test_accuracy'):.4f} |")


if __name__ == "__main__":
    main()
