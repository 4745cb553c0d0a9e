"""`dataselect-train`: train a model on the samples a selection strategy picks."""

from __future__ import annotations

import json
import sys
from typing import NoReturn

import click

from dataselect.cli import run_command
from dataselect.client.data import DATA_ENV, DATASETS
from dataselect.plugins.base import MODES


def _parse_options(values: tuple[str, ...]) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="'--option'")
        options[key.strip()] = value.strip()
    return options


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
@click.option("--dataset", type=click.Choice(list(DATASETS)), default="mnist",
              help="Dataset; synthetic is small, generated and needs no files.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              show_default=f"${DATA_ENV} or ~/.cache/dataselect/data",
              help="Folder holding the dataset in torchvision's layout (e.g. DIR/MNIST/raw/...).")
@click.option("--download/--no-download", default=True,
              help="Download a missing dataset (needs a network connection).")
@click.option("--model", default="cnn-small",
              help="Model architecture from the registry (`dataselect models` lists them).")
@click.option("--epochs", type=click.IntRange(min=1), default=1, help="Passes over the training set.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Samples trained on per step.")
@click.option("--lr", type=float, default=0.05, help="SGD learning rate.")
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
@click.option("--server", default=None, metavar="HOST:PORT",
              help="Score through a running dataselect-server instead of in-process.")
@click.option("--sync-every", type=click.IntRange(min=1), default=1, metavar="N",
              help="Push the model to the scorer every N steps.")
@click.option("--micro-batch", type=click.IntRange(min=1), default=1024,
              help="Micro-batch size for in-process scoring and for evaluation.")
@click.option("--init-from", type=click.Path(dir_okay=False), default=None, metavar="CKPT",
              help="Start from the weights of a dataselect checkpoint (same --model).")
@click.option("--budget-seconds", type=click.FloatRange(min=0, min_open=True), default=None, metavar="S",
              help="Stop training after S seconds (wall clock less dataset loading and evaluation), "
                   "then evaluate and write the summary (stopped_by: budget_seconds).")
@click.option("--budget-samples", type=click.IntRange(min=1), default=None, metavar="N",
              help="Stop training once N samples have been trained on (stopped_by: budget_samples).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, per-epoch lines or cost table.")
def train_command(**kw) -> None:
    """Train a model on the samples a selection strategy picks, and account for the cost.

    Without --server the strategy runs in-process; with --server HOST:PORT it
    runs in dataselect-server. The run ends with the test accuracy and the
    time split between training, scoring, transfer, evaluation and data.
    """
    from dataselect.client.train import TrainConfig, format_cost_table, train

    config = TrainConfig(
        strategy=kw["strategy"], options=_parse_options(kw["options"]), policy=kw["policy"], mode=kw["mode"] or "",
        dataset=kw["dataset"], data_dir=kw["data_dir"], download=kw["download"], model=kw["model"],
        epochs=kw["epochs"], batch_size=kw["batch_size"], lr=kw["lr"], momentum=kw["momentum"],
        weight_decay=kw["weight_decay"], select_fraction=kw["select_fraction"], seed=kw["seed"],
        device=kw["device"], threads=kw["threads"], train_subset=kw["train_subset"], test_subset=kw["test_subset"],
        output=kw["output"], server=kw["server"], sync_every=kw["sync_every"], micro_batch=kw["micro_batch"],
        init_from=kw["init_from"], progress=not kw["quiet"],
        budget_seconds=kw["budget_seconds"], budget_samples=kw["budget_samples"],
    )
    quiet = kw["quiet"]
    log = None if quiet else (lambda msg: click.echo(msg, err=True))
    summary = train(config, log=log)
    if not quiet:
        click.echo(format_cost_table(summary), err=True)
    if kw["as_json"]:
        click.echo(json.dumps(summary, indent=2))
    elif quiet:
        pass
    else:
        click.echo(f"test_accuracy {summary['test_accuracy']:.4f}")


def main(args: list[str] | None = None) -> NoReturn:
    run_command(train_command, args, prog_name="dataselect-train")


if __name__ == "__main__":
    main()
