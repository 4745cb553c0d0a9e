"""`dataselect-train`: train a model on the samples a selection strategy picks."""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from typing import NoReturn

import click

from dataselect.cli import run_command
from dataselect.names import CHECKPOINT_DTYPE_NAMES, MODES, ON_SERVER_FAILURE, PRECISIONS, SCHEDULES


def _parse_options(values: tuple[str, ...]) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="'--option'")
        options[key.strip()] = value.strip()
    return options


#: Command-line options that are not TrainConfig fields (or are converted on the way).
NOT_CONFIG = {"resume", "as_json", "quiet", "options", "mode"}


def config_from_options(config_class, kw: dict):
    """The TrainConfig of a command line: each field takes the click option of the same name (one
    declaration each; `tests/test_cli.py` checks that every field has its option and vice versa)."""
    names = {f.name for f in fields(config_class)}
    given = {k: v for k, v in kw.items() if k in names and k not in NOT_CONFIG}
    return config_class(**given, options=_parse_options(kw["options"]), mode=kw["mode"] or "",
                        progress=not kw["quiet"])


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--strategy", default="high_loss",
              help="Selection strategy (`dataselect strategies` lists them).")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="A strategy option; repeat for several.")
@click.option("--policy", default="", show_default="the strategy's default",
              help="Selection policy applied to the scores: topk, class_balanced, sample or threshold.")
@click.option("--mode", type=click.Choice(MODES), default=None, show_default="the strategy's default",
              help="Training mode. online: every step train on the selected part of a candidate pool; "
                   "subset: train on a selected fraction of the training set, re-selected every `refresh` "
                   "epochs (once for static strategies); weighted: each epoch draw a fraction of the "
                   "training set by importance (with replacement) and train on every draw.")
@click.option("--dataset", default="mnist", metavar="NAME[:ARG]",
              help="Dataset: mnist, cifar10, synthetic (small, generated, needs no files), imagefolder:DIR "
                   "(DIR/train/<class>/*, DIR/test/<class>/*), torchvision:CLASS (e.g. torchvision:FashionMNIST), "
                   "or one a plugin registers (`dataselect datasets` lists them).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              show_default="$DATASELECT_DATA or ~/.cache/dataselect/data",
              help="Folder holding the dataset in torchvision's layout (e.g. DIR/MNIST/raw/...).")
@click.option("--augment/--no-augment", default=True,
              help="The dataset's standard training augmentation (CIFAR: random crop + flip; MNIST: none).")
@click.option("--label-noise", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0, metavar="P",
              help="Symmetric label noise on the training split: each label, with probability P, becomes another "
                   "class (seeded; the clean labels are kept and the summary counts noisy samples trained on).")
@click.option("--imbalance", type=click.FloatRange(min=1.0), default=1.0, metavar="R",
              help="Long-tailed training split: the largest class R times the smallest (seeded).")
@click.option("--num-workers", type=click.IntRange(min=0), default=None, show_default="up to 4, half the CPUs",
              help="DataLoader workers for datasets that are not held in memory (imagefolder, torchvision).")
@click.option("--download/--no-download", default=True,
              help="Download a missing dataset (needs a network connection).")
@click.option("--model", default="cnn-small",
              help="Model architecture from the registry (`dataselect models` lists them).")
@click.option("--epochs", type=click.IntRange(min=1), default=1, help="Passes over the training set.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Samples trained on per step.")
@click.option("--lr", type=click.FloatRange(min=0.0, min_open=True), default=0.05, help="SGD learning rate.")
@click.option("--lr-schedule", type=click.Choice(SCHEDULES), default="constant",
              help="Learning-rate schedule over the run's steps: constant, cosine (down to 0) or onecycle "
                   "(warm up over the first 30 %, then anneal).")
@click.option("--momentum", type=click.FloatRange(min=0.0), default=0.9, help="SGD momentum.")
@click.option("--weight-decay", type=click.FloatRange(min=0.0), default=0.0, help="SGD weight decay.")
@click.option("--select-fraction", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.5,
              help="Fraction of each candidate pool trained on (pool = batch / fraction); 1.0 trains on all data and scores nothing.")
@click.option("--seed", type=int, default=0, help="Seed for initialisation, shuffling and selection.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch (default: torch's choice).")
@click.option("--train-subset", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train on the first N training samples only (quick runs).")
@click.option("--test-subset", type=click.IntRange(min=1), default=None, metavar="N",
              help="Evaluate on the first N test samples only.")
@click.option("--output", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Write metrics.jsonl, summary.json and checkpoint.pt here.")
@click.option("--server", default=None, metavar="HOST:PORT[,HOST:PORT...]",
              help="Score through a running dataselect-server instead of in-process; several comma-separated "
                   "replicas share each pool (ids hashed to replicas; a replica that goes down hands its share "
                   "to the others).")
@click.option("--sync-every", type=click.IntRange(min=1), default=1, metavar="N",
              help="Push the model to the scorer every N steps (online mode); with --overlap the "
                   "strategy then scores with a model at most N steps stale.")
@click.option("--overlap/--no-overlap", default=None, show_default="on with --server, off in-process",
              help="Score the next pool while training on this one (scoring leaves the critical path); "
                   "checkpoint pushes and reports also run in the background.")
@click.option("--ramp-steps", type=click.IntRange(min=0), default=None, metavar="N",
              show_default="25 / --select-fraction with overlap (100 at 0.25), 0 without",
              help="With overlap, online mode: the share kept from each pool falls from all of it to "
                   "--select-fraction over the first N steps, so scores one step stale cannot collapse "
                   "training early on (0: select at the full fraction from the first step).")
@click.option("--checkpoint-dtype", type=click.Choice(CHECKPOINT_DTYPE_NAMES), default="float32",
              help="With --server: dtype the weights travel in; float16/bfloat16 halve the bytes per push "
                   "(the server scores with them converted back to float32).")
@click.option("--checkpoint-delta", is_flag=True,
              help="With --server: push only the tensors that changed since the previous push.")
@click.option("--micro-batch", type=click.IntRange(min=1), default=1024,
              help="Micro-batch size for in-process scoring and for evaluation.")
@click.option("--score-input-scale", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0,
              help="Score on inputs downscaled by this factor (0.5 = half height and width; embedded or remote). "
                   "Needs a model that takes smaller inputs (cnn-deep, resnet18; not cnn-small).")
@click.option("--score-precision", type=click.Choice(PRECISIONS), default="auto",
              help="In-process scoring: autocast dtype for forward signals; auto = bf16 on CUDA, fp32 on CPU "
                   "(a server sets its own with dataselect-server --precision).")
@click.option("--score-compile", is_flag=True,
              help="In-process scoring: torch.compile the scoring model (slow first call).")
@click.option("--init-from", type=click.Path(dir_okay=False), default=None, metavar="CKPT",
              help="Start from the weights of a dataselect checkpoint (same --model).")
@click.option("--budget-seconds", type=click.FloatRange(min=0, min_open=True), default=None, metavar="S",
              help="Stop training after S seconds (wall clock less dataset loading and evaluation), "
                   "then evaluate and write the summary (stopped_by: budget_seconds).")
@click.option("--budget-samples", type=click.IntRange(min=1), default=None, metavar="N",
              help="Stop training once N samples have been trained on (stopped_by: budget_samples).")
@click.option("--eval-every", type=click.IntRange(min=1), default=None, metavar="N",
              help="Also evaluate every N trained samples (summary.json: eval_points), for time-to-accuracy "
                   "finer than an epoch.")
@click.option("--target-accuracy", type=click.FloatRange(0.0, 1.0, min_open=True), default=None, metavar="A",
              help="Stop once test accuracy reaches A (e.g. 0.99); summary.json gives time_to_target_seconds "
                   "(wall-clock less data loading and evaluation) and samples_to_target.")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True), default=None, metavar="FILE",
              help="File holding the server's bearer token (default: env DATASELECT_TOKEN).")
@click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True), default=None, metavar="PEM",
              help="CA certificate to verify a TLS server (use with a server started with --tls-cert).")
@click.option("--on-server-failure", type=click.Choice(ON_SERVER_FAILURE), default="retry", show_default=True,
              help="When the server goes away: retry (reconnect with backoff, reopen the session, re-upload the "
                   "checkpoint; fail after --retry-seconds) or fallback (then score in-process for the rest of the run).")
@click.option("--retry-seconds", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="How long to keep reconnecting to a lost server.")
@click.option("--resume", type=click.Path(file_okay=False, exists=True), default=None, metavar="DIR",
              help="Continue the run whose --output was DIR from its last finished epoch "
                   "(its saved options are used; --server may point it at a new server).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress, per-epoch lines or cost table: only the final result line.")
def train_command(**kw) -> None:
    """Train a model on the samples a selection strategy picks, and account for the cost.

    Without --server the strategy runs in-process; with --server HOST:PORT it
    runs in dataselect-server. The run ends with the test accuracy and the
    time split between training, scoring, transfer, evaluation and data.
    """
    from dataselect.client.train import TrainConfig, format_cost_table, resume, train

    from dataselect.client.distributed import rank

    quiet = kw["quiet"] or rank() != 0  # under torchrun rank 0 speaks for the run
    kw["as_json"] = kw["as_json"] and rank() == 0
    log = None if quiet else (lambda msg: click.echo(msg, err=True))
    if kw["resume"]:
        summary = resume(kw["resume"], server=kw["server"], log=log)
        _finish(summary, quiet, kw["as_json"], format_cost_table)
        return
    config = config_from_options(TrainConfig, kw)
    _finish(train(config, log=log), quiet, kw["as_json"], format_cost_table)


def _finish(summary: dict, quiet: bool, as_json: bool, format_cost_table) -> None:
    if not quiet:
        click.echo(format_cost_table(summary), err=True)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:  # the result line, even with -q
        click.echo(f"test_accuracy {summary['test_accuracy']:.4f}")


def main(args: list[str] | None = None) -> NoReturn:
    run_command(train_command, args, prog_name="dataselect-train")


if __name__ == "__main__":
    main()
