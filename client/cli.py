"""`dataselect-train`: train a model on the samples a selection strategy picks."""

from __future__ import annotations

from typing import NoReturn

import click

from dataselect.cli import run_command
from dataselect.client.config import trainer_options


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@trainer_options()
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
    # The one deferred import of the command: torch and the engine load once the arguments have parsed,
    # so --help and argument errors stay fast (benchmarks/bench_startup.py).
    from dataselect.client.train import run_from_command_line

    run_from_command_line(kw)


def main(args: list[str] | None = None) -> NoReturn:
    run_command(train_command, args, prog_name="dataselect-train")


if __name__ == "__main__":
    main()
