"""dataselect: train on the samples that matter.

The package root is the Python API (see the README, "Use from Python"):

    import dataselect

    session = dataselect.Session("high_loss", model, epochs=3)     # server="host:50051" to score remotely
    for epoch in range(3):
        for x, y in session.loader(train_set, batch_size=64):
            loss = session.loss(model(x), y)
            ...

* `Session`, `Batch`, `Chosen`, `EngineOptions`, `RemoteOptions`: selection in your own loop.
* `Strategy`, `Option`, `Pool`, `Selection`, `Progress`, `RunPlan`, `hookimpl`: what a strategy
  plugin needs (`@dataselect.hookimpl def register_strategies(register): ...`).
* `build_model`, `list_models`: the model registry.

Names are imported when first used, so `import dataselect` stays cheap (no torch
until something needs it). `dataselect.server` is the scoring service,
`dataselect.client` the transports and the trainer, `dataselect.plugins` the
built-in plugins and strategies. The strategy API (`dataselect.strategy`,
`dataselect.policies`), the hook specifications (`dataselect.hookspecs`) and the
plugin registry (`dataselect.registry`) are part of this core package.
"""

from __future__ import annotations

import importlib
from typing import Any

from dataselect.hookspecs import hookimpl

__version__ = "0.1.0"

_EXPORTS = {
    "Session": "dataselect.client.session",
    "Batch": "dataselect.client.session",
    "Chosen": "dataselect.client.session",
    "weighted_loss": "dataselect.client.session",
    "EngineOptions": "dataselect.client.session",
    "RemoteOptions": "dataselect.client.session",
    "SelectionLoader": "dataselect.client.loader",
    "SelectionSampler": "dataselect.client.loader",
    "WithIds": "dataselect.client.loader",
    "Strategy": "dataselect.strategy",
    "Selector": "dataselect.strategy",  # the 0.1 name of Strategy
    "Option": "dataselect.strategy",
    "Pool": "dataselect.strategy",
    "Report": "dataselect.strategy",
    "Selection": "dataselect.strategy",
    "Progress": "dataselect.strategy",
    "RunPlan": "dataselect.strategy",
    "build_model": "dataselect.models",
    "list_models": "dataselect.models",
    "export_model": "dataselect.exported",
}

__all__ = ["hookimpl", "__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dataselect' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
