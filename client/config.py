"""`TrainConfig`: every trainer option, declared once.

Each field carries its command-line option in its metadata (flag, type with its range or choices,
help, metavar). `dataselect-train` and `dataselect compare` build their click options from these
declarations (`trainer_options`), `validate_config` holds a config built in Python to the same ranges
(`check_ranges`), and `compare` turns the options it was given back into a trainer command line
(`to_argv`). Adding a trainer option is adding one field here. This module needs no torch, so
`--help` stays fast.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Callable, Iterable

import click

from dataselect.errors import InvalidArgument
from dataselect.names import CHECKPOINT_DTYPE_NAMES, MODES, ON_SERVER_FAILURE, PRECISIONS, SCHEDULES

__all__ = ["TrainConfig", "trainer_options", "config_from_options", "check_ranges", "to_argv", "option_fields"]


@dataclass(frozen=True)
class OptionSpec:
    """A field's command-line option: click's keyword arguments plus how its value reaches the config."""

    decls: tuple[str, ...]
    kwargs: dict[str, Any]
    #: Command-line value -> field value (e.g. `--option` strings -> a dict); None = as given.
    convert: Callable[[Any], Any] | None = None


def _option(default: Any = MISSING, *, help: str, decls: Iterable[str] = (), default_factory: Any = MISSING,
            cli_default: Any = MISSING, convert: Callable[[Any], Any] | None = None, **click_kwargs: Any) -> Any:
    """A dataclass field and its click option in one declaration.

    `decls` default to `--the-field-name`; `cli_default` is the option's default when it differs from
    the field's (a value `convert` maps to the field's default); other keywords go to `click.option`.
    """
    kwargs = {"help": help, **click_kwargs}
    if cli_default is not MISSING:
        kwargs["default"] = cli_default
    elif default is not MISSING:
        kwargs["default"] = default
    spec = OptionSpec(tuple(decls), kwargs, convert)
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata={"option": spec})
    return field(default=default, metadata={"option": spec})


def parse_key_values(values: Iterable[str]) -> dict[str, str]:
    """`--option KEY=VALUE` strings -> {KEY: VALUE}."""
    options: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="'--option'")
        options[key.strip()] = value.strip()
    return options


_STRATEGY_DEFAULT = "the strategy's default"


@dataclass
class TrainConfig:
    """What `dataselect.client.train.train` runs: one field per `dataselect-train` option (its help is the
    field's documentation), plus `progress`, which `--quiet` turns off."""

    strategy: str = _option("high_loss", help="Selection strategy (`dataselect strategies` lists them).")
    #: Strategy options as given (CLI strings or JSON values); the strategy validates them.
    options: dict[str, Any] = _option(
        default_factory=dict, cli_default=(), decls=("--option", "-o", "options"), multiple=True,
        metavar="KEY=VALUE", convert=parse_key_values, help="A strategy option; repeat for several.")
    policy: str = _option("", show_default=_STRATEGY_DEFAULT,
                          help="Selection policy applied to the scores: topk, class_balanced, sample or threshold.")
    mode: str = _option(
        "", cli_default=None, convert=lambda v: v or "", type=click.Choice(MODES), show_default=_STRATEGY_DEFAULT,
        help="Training mode. online: every step train on the selected part of a candidate pool; "
             "subset: train on a selected fraction of the training set, re-selected every `refresh` "
             "epochs (once for static strategies); weighted: each epoch draw a fraction of the "
             "training set by importance (with replacement) and train on every draw.")
    dataset: str = _option(
        "mnist", metavar="NAME[:ARG]",
        help="Dataset: mnist, cifar10, synthetic (small, generated, needs no files), imagefolder:DIR "
             "(DIR/train/<class>/*, DIR/test/<class>/*), torchvision:CLASS (e.g. torchvision:FashionMNIST), "
             "or one a plugin registers (`dataselect datasets` lists them).")
    data_dir: str | None = _option(
        None, type=click.Path(file_okay=False), show_default="$DATASELECT_DATA or ~/.cache/dataselect/data",
        help="Folder holding the dataset in torchvision's layout (e.g. DIR/MNIST/raw/...).")
    augment: bool = _option(True, decls=("--augment/--no-augment",),
                            help="The dataset's standard training augmentation (CIFAR: random crop + flip; MNIST: none).")
    label_noise: float = _option(
        0.0, type=click.FloatRange(0.0, 1.0, max_open=True), metavar="P",
        help="Symmetric label noise on the training split: each label, with probability P, becomes another "
             "class (seeded; the clean labels are kept and the summary counts noisy samples trained on).")
    imbalance: float = _option(1.0, type=click.FloatRange(min=1.0), metavar="R",
                               help="Long-tailed training split: the largest class R times the smallest (seeded).")
    num_workers: int | None = _option(
        None, type=click.IntRange(min=0), show_default="up to 4, half the CPUs",
        help="DataLoader workers for datasets that are not held in memory (imagefolder, torchvision).")
    download: bool = _option(True, decls=("--download/--no-download",),
                             help="Download a missing dataset (needs a network connection).")
    model: str = _option("cnn-small", help="Model architecture from the registry (`dataselect models` lists them).")
    epochs: int = _option(1, type=click.IntRange(min=1), help="Passes over the training set.")
    batch_size: int = _option(64, type=click.IntRange(min=1), help="Samples trained on per step.")
    lr: float = _option(0.05, type=click.FloatRange(min=0.0, min_open=True), help="SGD learning rate.")
    lr_schedule: str = _option(
        "constant", type=click.Choice(SCHEDULES),
        help="Learning-rate schedule over the run's steps: constant, cosine (down to 0) or onecycle "
             "(warm up over the first 30 %, then anneal).")
    momentum: float = _option(0.9, type=click.FloatRange(min=0.0), help="SGD momentum.")
    weight_decay: float = _option(0.0, type=click.FloatRange(min=0.0), help="SGD weight decay.")
    select_fraction: float = _option(
        0.5, type=click.FloatRange(0.0, 1.0, min_open=True),
        help="Fraction of each candidate pool trained on (pool = batch / fraction); 1.0 trains on all data "
             "and scores nothing.")
    seed: int = _option(0, type=int, help="Seed for initialisation, shuffling and selection.")
    device: str = _option("auto", help="auto, cpu, cuda, cuda:N or mps.")
    threads: int | None = _option(None, type=click.IntRange(min=1),
                                  help="CPU threads for torch (default: torch's choice).")
    train_subset: int | None = _option(None, type=click.IntRange(min=1), metavar="N",
                                       help="Train on the first N training samples only (quick runs).")
    test_subset: int | None = _option(None, type=click.IntRange(min=1), metavar="N",
                                      help="Evaluate on the first N test samples only.")
    output: str | None = _option(None, type=click.Path(file_okay=False), metavar="DIR",
                                 help="Write metrics.jsonl, summary.json and checkpoint.pt here.")
    server: str | None = _option(
        None, metavar="HOST:PORT[,HOST:PORT...]",
        help="Score through a running dataselect-server instead of in-process; several comma-separated "
             "replicas share each pool (ids hashed to replicas; a replica that goes down hands its share "
             "to the others).")
    #: Subset and weighted modes push once before each whole-set selection instead (the scorer's copy
    #: is not used in between).
    sync_every: int = _option(
        1, type=click.IntRange(min=1), metavar="N",
        help="Push the model to the scorer every N steps (online mode); with --overlap the "
             "strategy then scores with a model at most N steps stale.")
    overlap: bool | None = _option(
        None, decls=("--overlap/--no-overlap",), show_default="on with --server, off in-process",
        help="Score the next pool while training on this one (scoring leaves the critical path); "
             "checkpoint pushes and reports also run in the background.")
    ramp_steps: int | None = _option(
        None, type=click.IntRange(min=0), metavar="N",
        show_default="25 / --select-fraction with overlap (100 at 0.25), 0 without",
        help="With overlap, online mode: the share kept from each pool falls from all of it to "
             "--select-fraction over the first N steps, so scores one step stale cannot collapse "
             "training early on (0: select at the full fraction from the first step).")
    checkpoint_dtype: str = _option(
        "float32", type=click.Choice(CHECKPOINT_DTYPE_NAMES),
        help="With --server: dtype the weights travel in; float16/bfloat16 halve the bytes per push "
             "(the server scores with them converted back to float32).")
    checkpoint_delta: bool = _option(False, is_flag=True,
                                     help="With --server: push only the tensors that changed since the previous push.")
    micro_batch: int = _option(1024, type=click.IntRange(min=1),
                               help="Micro-batch size for in-process scoring and for evaluation.")
    score_input_scale: float = _option(
        1.0, type=click.FloatRange(0.0, 1.0, min_open=True),
        help="Score on inputs downscaled by this factor (0.5 = half height and width; embedded or remote). "
             "Needs a model that takes smaller inputs (cnn-deep, resnet18; not cnn-small).")
    score_precision: str = _option(
        "auto", type=click.Choice(PRECISIONS),
        help="In-process scoring: autocast dtype for forward signals; auto = bf16 on CUDA, fp32 on CPU "
             "(a server sets its own with dataselect-server --precision).")
    score_compile: bool = _option(False, is_flag=True,
                                  help="In-process scoring: torch.compile the scoring model (slow first call).")
    init_from: str | None = _option(None, type=click.Path(dir_okay=False), metavar="CKPT",
                                    help="Start from the weights of a dataselect checkpoint (same --model).")
    budget_seconds: float | None = _option(
        None, type=click.FloatRange(min=0, min_open=True), metavar="S",
        help="Stop training after S seconds (wall clock less dataset loading and evaluation), "
             "then evaluate and write the summary (stopped_by: budget_seconds).")
    budget_samples: int | None = _option(
        None, type=click.IntRange(min=1), metavar="N",
        help="Stop training once N samples have been trained on (stopped_by: budget_samples).")
    eval_every: int | None = _option(
        None, type=click.IntRange(min=1), metavar="N",
        help="Also evaluate every N trained samples (summary.json: eval_points), for time-to-accuracy "
             "finer than an epoch.")
    target_accuracy: float | None = _option(
        None, type=click.FloatRange(0.0, 1.0, min_open=True), metavar="A",
        help="Stop once test accuracy reaches A (e.g. 0.99); summary.json gives time_to_target_seconds "
             "(wall-clock less data loading and evaluation) and samples_to_target.")
    token_file: str | None = _option(
        None, type=click.Path(dir_okay=False, exists=True), metavar="FILE",
        help="File holding the server's bearer token (default: env DATASELECT_TOKEN).")
    tls_ca: str | None = _option(
        None, type=click.Path(dir_okay=False, exists=True), metavar="PEM",
        help="CA certificate to verify a TLS server (use with a server started with --tls-cert).")
    on_server_failure: str = _option(
        "retry", type=click.Choice(ON_SERVER_FAILURE), show_default=True,
        help="When the server goes away: retry (reconnect with backoff, reopen the session, re-upload the "
             "checkpoint; fail after --retry-seconds) or fallback (then score in-process for the rest of the run).")
    retry_seconds: float = _option(60.0, type=click.FloatRange(min=0), show_default=True,
                                   help="How long to keep reconnecting to a lost server.")
    #: Per-epoch progress bar and lines (`--quiet` turns them off); not an option of its own.
    progress: bool = True


def option_fields(exclude: Iterable[str] = ()) -> list[Field]:
    """TrainConfig's fields that are command-line options, in `--help` order."""
    skip = set(exclude)
    return [f for f in fields(TrainConfig) if "option" in f.metadata and f.name not in skip]


def _decls(f: Field) -> tuple[str, ...]:
    return f.metadata["option"].decls or ("--" + f.name.replace("_", "-"),)


def trainer_options(*, exclude: Iterable[str] = (), passthrough: bool = False) -> Callable:
    """Decorate a click command with the trainer's options, generated from TrainConfig.

    `passthrough`: for a command that hands them on to `dataselect-train` (`compare`): every option
    defaults to "not given" (None, or () for repeatable ones) so only what the user typed is passed.
    """
    def decorate(command: Callable) -> Callable:
        for f in reversed(option_fields(exclude)):
            kwargs = dict(f.metadata["option"].kwargs)
            if passthrough:
                kwargs["default"] = () if kwargs.get("multiple") else None
                kwargs["show_default"] = False
            command = click.option(*_decls(f), **kwargs)(command)
        return command
    return decorate


def config_from_options(kw: dict[str, Any], **extra: Any) -> TrainConfig:
    """The TrainConfig of a command line: each field takes its option's value by name, converted."""
    values = {}
    for f in option_fields():
        if f.name in kw:
            convert = f.metadata["option"].convert
            values[f.name] = convert(kw[f.name]) if convert else kw[f.name]
    return TrainConfig(**values, **extra)


def to_argv(kw: dict[str, Any], exclude: Iterable[str] = ()) -> list[str]:
    """The `dataselect-train` arguments for the trainer options given in `kw` (a passthrough command's
    parameters): unset ones (None, (), a flag left off) are left out, so the trainer's defaults apply."""
    argv: list[str] = []
    for f in option_fields(exclude):
        value = kw.get(f.name)
        if value is None or value == () or value is False and f.metadata["option"].kwargs.get("is_flag"):
            continue
        decl = _decls(f)[0]
        if "/" in decl:  # --name/--no-name
            on, off = decl.split("/")
            argv.append(on if value else off)
        elif f.metadata["option"].kwargs.get("is_flag"):
            argv.append(decl)
        elif f.metadata["option"].kwargs.get("multiple"):
            for item in value:
                argv += [decl, str(item)]
        else:
            argv += [decl, str(value)]
    return argv


def check_ranges(config: TrainConfig) -> None:
    """Each field against its option's declared range or choices, so a config built in Python is held
    to what `--help` shows. A field left at its default is not checked (`mode` "" = the strategy's)."""
    for f in option_fields():
        value = getattr(config, f.name)
        kind = f.metadata["option"].kwargs.get("type")
        if value is None or value == f.default or not isinstance(
                kind, (click.IntRange, click.FloatRange, click.Choice)):
            continue
        try:
            kind.convert(value, None, None)
        except click.BadParameter as exc:
            raise InvalidArgument(f"{_decls(f)[0].split('/')[0]}: {exc.message}") from None
