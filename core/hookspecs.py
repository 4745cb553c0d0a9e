"""Hook specifications for dataselect plugins: the whole plugin API.

A plugin is a module (or object) with functions marked `@dataselect.hookimpl`
whose names match the specifications below. It is found through the
`dataselect` entry-point group of an installed distribution:

    [project.entry-points.dataselect]
    my_plugin = "my_package.plugin"

Compatibility promise: arguments can be added to a hook later but never
removed (or renamed), so an implementation written today keeps working; an
implementation may accept any subset of a hook's arguments (name them
exactly as here). A function marked `@dataselect.hookimpl` whose name is not
one of these hooks (a misspelling) makes the plugin fail at load time with a
message naming the hook and the plugin.

The plugin guide (docs/plugins.md) has one `###` heading per hook below (a test checks
it), with the signature and this docstring.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "dataselect"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_strategies(register: Callable[..., None]) -> None:
    """Register selection strategies.

    Call `register(StrategyClass)` once per strategy. The class subclasses
    `dataselect.strategy.Strategy` and sets at least `name` (letters,
    digits, `_` or `-`; what users pass to `--strategy`) and `description`.
    The registration is checked at load time: the class must be a Strategy,
    `default_mode` one of online/subset/weighted, `default_policy` one of
    topk/class_balanced/sample/threshold, and `signals` names the engine
    knows. A name taken by another plugin is refused with an error naming
    both plugins. A plugin whose registration fails registers nothing and is
    listed with its error by `dataselect plugins`; the other plugins load.

    Example:

        @dataselect.hookimpl
        def register_strategies(register):
            register(MyStrategy)
    """


@hookspec
def register_selectors(register: Callable[..., None]) -> None:
    """The 0.1 name of `register_strategies`, kept so plugins written against it still load.

    It is called with the same `register(StrategyClass)` and the same checks, after
    `register_strategies`; new plugins implement `register_strategies`. A class
    registered through both is a name registered twice, and the plugin is refused.
    """


@hookspec
def register_models(register: Callable[..., None]) -> None:
    """Register model architectures, so the server and trainer can build them.

    Call `register(name, builder)` once per architecture; `name` is what
    users pass to `dataselect-train --model`. `builder(**kwargs)` returns any
    `nn.Module` that maps a batch to logits `[N, num_classes]` (a torchvision
    constructor such as `torchvision.models.resnet18` works as it is). The
    trainer offers `num_classes`, `in_channels`, `image_size`, `mean` and
    `std`; the builder gets the ones it accepts, and a model that takes no
    `mean`/`std` is wrapped so that it receives normalised float images.
    Last-layer signals use the model's final `nn.Linear`, found by a trial
    forward. Subclassing `dataselect.models.Classifier` (set
    `self.classifier`, define `body(x)` returning features) is the fast
    path: the model takes uint8 images and normalises them itself. The
    plugin must be installed where the server runs (the checkpoint names the
    model, not its code; a model the server has no code for can travel as a
    `torch.export` program instead). A name taken by another plugin is
    refused naming both plugins.

    Optional: a builder with a `slim_kwargs(kwargs, ratio)` method (mixin
    `dataselect.models.Slimmable`) returns the kwargs of a narrower twin whose
    every tensor is the leading slice of the full model's; such a model can
    serve `dynams proxy=psp` (the parameter-sharing proxy, `dataselect.proxy`).

    Example:

        @dataselect.hookimpl
        def register_models(register):
            register("tiny-cnn", TinyCNN)
    """


@hookspec
def register_datasets(register: Callable[..., None]) -> None:
    """Register datasets, so `dataselect-train --dataset NAME` and `dataselect.datasets.open_dataset` find them.

    Call `register(name, loader)` once per dataset; `name` is letters,
    digits, `_` or `-`. Users write `NAME` or `NAME:ARGUMENT` (everything
    after the first colon is the argument, e.g. a folder). The loader is
    called with keywords only:

        loader(*, root: Path, argument: str | None, download: bool,
               seed: int, augment: bool) -> dataselect.datasets.DataSource

    `root` is the data directory (`--data-dir`, else `$DATASELECT_DATA`, else
    `~/.cache/dataselect/data`); `seed` fixes anything random the loader does
    (a held-out split, a sample for mean/std); `augment=False` turns the
    training augmentation off. Return the full splits: `open_dataset` applies
    `train_subset`, `test_subset`, label noise and class imbalance for every
    dataset. Items are `(input, int label)`; images are uint8 `[C, H, W]`
    tensors (models normalise inside with `DatasetInfo.mean/std`; left as
    None they are estimated from a sample). `train_labels` must list every
    training label without decoding the inputs. A dataset that fits in memory
    also sets `train_tensors`/`test_tensors` (a `Split`; `train_subset` then
    keeps the first N samples, else a seeded random N) and `augment_batch`.
    A loader may declare `loader.argument = "DIR"` (shown as `NAME:DIR` in
    listings; the argument is then required, otherwise refused) and
    `loader.check(argument)`, a fast validation without loading data. Raise
    `dataselect.errors.InvalidArgument` or `NotFound` with a message saying
    what to fix. A name taken by another plugin is refused naming both
    plugins.

    Example:

        @dataselect.hookimpl
        def register_datasets(register):
            register("my-sensors", load_my_sensors)
    """


@hookspec
def register_auxiliary_losses(register: Callable[..., None]) -> None:
    """Register auxiliary loss terms a strategy may ask the trainer to add (`Strategy.auxiliary_loss`).

    Call `register(name, factory)` once per term. When a session opens with a
    strategy whose `auxiliary_loss` names it, the trainer calls, keywords only,

        factory(module, *, model_name: str | None, model_kwargs: dict | None,
                params: dict, device: torch.device) -> term

    with the user's model (`model_name` None when it is not a registered one)
    and the strategy's `params`, and then, for every batch it trains on,
    `term(model, inputs, targets)`, which returns one loss per sample `[N]`;
    the trainer adds `weight` times their (selection-weighted) mean to its
    loss. Anything the term trains (a second head, a sub-network) is its own
    business: it may keep modules on `term`, and its parameters must be ones
    the optimiser already holds (views of the model's). Raise
    `dataselect.errors.InvalidArgument` naming the fix when the model cannot
    support the term. The term runs in the trainer's process, so it must be
    installed there; the scorer only sends its name. A name taken by another
    plugin is refused naming both plugins.

    Example:

        @dataselect.hookimpl
        def register_auxiliary_losses(register):
            register("logit_l2", lambda module, **kw: lambda model, x, y: model(x).pow(2).mean(1))
    """
