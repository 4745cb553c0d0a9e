"""The `dataselect` command: what is installed (strategies, plugins, models, datasets) and `compare`."""

from __future__ import annotations

import json
from typing import NoReturn

import click

from dataselect import registry
from dataselect.cli import run_command
from dataselect.client.config import trainer_options


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dataselect")
def cli() -> None:
    """Inspect what dataselect has installed.

    Training is `dataselect-train`; the scoring service is `dataselect-server`.
    """


def _strategy_rows() -> list[dict]:
    rows = []
    for name, reg in registry.strategies().items():
        info = reg.obj.info()
        rows.append({**info, "name": name, "plugin": reg.plugin, "distribution": reg.distribution, "version": reg.version})
    return rows


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def strategies(as_json: bool) -> None:
    """List the registered selection strategies.

    Shows each strategy's description, default training mode and selection
    policy, the signals it needs, its options, and the plugin (and
    distribution) that registered it.
    """
    rows = _strategy_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']}  [mode {row['default_mode']}, policy {row['default_policy']}]"
                   f"  from {row['plugin']} ({row['distribution']} {row['version']})")
        if row["description"]:
            click.echo(f"    {row['description']}")
        if row["signals"]:
            click.echo(f"    signals: {', '.join(row['signals'])}")
        for opt, spec in row["options"].items():
            extra = f"; one of {', '.join(map(str, spec['choices']))}" if spec.get("choices") else ""
            if "min" in spec or "max" in spec:
                extra += f"; in [{spec.get('min', '-inf')}, {spec.get('max', 'inf')}]"
            click.echo(f"    -o {opt}=<{spec['type']}> (default {spec['default']!r}{extra}) {spec.get('help', '')}".rstrip())


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def plugins(as_json: bool) -> None:
    """List loaded plugins: name, distribution, version, hooks, and load errors."""
    rows = registry.plugins()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        status = f"  ERROR: {row['error']}" if row.get("error") else ""
        click.echo(f"{row['name']}  ({row['distribution']} {row['version']})  hooks: {', '.join(row['hooks']) or '-'}{status}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def models(as_json: bool) -> None:
    """List the registered model architectures (`dataselect-train --model NAME`)."""
    rows = [{"name": name, "plugin": reg.plugin, "distribution": reg.distribution, "version": reg.version,
             "description": (getattr(reg.obj, "__doc__", None) or "").strip().splitlines()[0:1]}
            for name, reg in registry.models().items()]
    for row in rows:
        row["description"] = row["description"][0] if row["description"] else ""
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']:<12} {row['description']}  (from {row['plugin']})")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def datasets(as_json: bool) -> None:
    """List the registered datasets (`dataselect-train --dataset NAME[:ARG]`)."""
    rows = []
    for name, reg in registry.datasets().items():
        argument = getattr(reg.obj, "argument", None)
        doc = (getattr(reg.obj, "__doc__", None) or "").strip().splitlines()
        rows.append({"name": f"{name}:{argument}" if argument else name, "plugin": reg.plugin,
                     "distribution": reg.distribution, "version": reg.version, "description": doc[0] if doc else ""})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']:<20} {row['description']}  (from {row['plugin']})")


#: Trainer options compare declares itself (plural, per repeat or per variant), so it does not pass them on.
COMPARE_OWNS = ("strategy", "model", "dataset", "epochs", "seed", "output", "label_noise", "imbalance")


@cli.command("compare", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--strategies", help="Comma-separated strategies [default: every registered strategy]. "
              "The full-data baseline is always added.")
@click.option("--models", default="cnn-small", show_default=True, help="Comma-separated models.")
@click.option("--dataset", "datasets", default="mnist", show_default=True,
              help="Comma-separated datasets (NAME or NAME:ARG, e.g. imagefolder:DIR).")
@click.option("--variants", default="clean", show_default=True,
              help="Comma-separated dataset variants of the training split: clean, noise=P (symmetric label "
                   "noise), imbalance=R (long-tailed classes), or both joined with '+'; each is its own row.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Runs per combination; repeat r uses seed + r.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for runs, tables and plots.")
@click.option("--target", type=click.FloatRange(0, 1, min_open=True),
              help="Target test accuracy (fraction) for time-to-accuracy [default: full-data accuracy − 0.005].")
@click.option("--resume", is_flag=True, help="Skip runs whose summary.json already exists.")
@trainer_options(exclude=COMPARE_OWNS, passthrough=True)
@click.argument("extra", nargs=-1, type=click.UNPROCESSED, metavar="[-- TRAINER OPTIONS...]")
def compare_command(**options) -> None:
    """Compare selection strategies × models × datasets: accuracy against cost.

    Runs `dataselect-train` once per strategy, model, dataset and repeat (plus the
    full-data baseline), then writes results.csv, results.md, accuracy_vs_time.png
    and cost_breakdown.png into OUTPUT. Every `dataselect-train` option below
    reaches every run unchanged (the baseline keeps --select-fraction 1.0 and no
    strategy options); `--budget-seconds` / `--budget-samples` compare at equal
    wall-clock or equal work; arguments after `--` are passed as written. E.g.
    `dataselect compare --strategies high_loss --output out --overlap --lr-schedule cosine`.
    """
    # The command's one deferred import: the runner loads torch (dataset checks), so it waits for the arguments.
    from dataselect.client.compare import run_from_command_line

    run_from_command_line(**options)


def main(args: list[str] | None = None) -> NoReturn:
    run_command(cli, args, prog_name="dataselect")


if __name__ == "__main__":
    main()
