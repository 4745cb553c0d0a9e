"""Hook specifications for dataselect plugins.

A plugin is a module (or object) with functions marked `@dataselect.hookimpl`
whose names match the specifications below. It is found through the
`dataselect` entry-point group of an installed distribution:

    [project.entry-points.dataselect]
    my_plugin = "my_package.plugin"

Rules for compatibility: arguments may be added to a hook in later versions
but are never renamed or removed; an implementation may accept any subset of
a hook's arguments.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "dataselect"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_selectors(register: Callable[..., None]) -> None:
    """Register selection strategies.

    Call `register(SelectorClass)` once per strategy. The class subclasses
    `dataselect.plugins.base.Selector` and sets at least `name` and
    `description`; the name must not be taken by another plugin (a clash
    fails at load time naming both plugins).
    """


@hookspec
def register_models(register: Callable[..., None]) -> None:
    """Register model architectures for the model registry.

    Call `register(name, builder)` once per architecture, where
    `builder(**kwargs)` returns an `nn.Module` following the model protocol
    of `dataselect.models` (a `features(x)` method returning penultimate
    features and a final `nn.Linear` named `classifier`). The builder always
    receives `num_classes`, `in_channels`, `image_size`, `mean` and `std`.
    """
