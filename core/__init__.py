"""dataselect: train on the samples that matter.

The `dataselect` package itself holds the pieces both sides share (tensor
codec, model registry, checkpoints, signals engine, scoring session);
`dataselect.server` is the scoring service, `dataselect.client` the trainer,
`dataselect.plugins` the plugin system and the built-in strategies.

A plugin writes `@dataselect.hookimpl` on its hook implementations.
"""

from dataselect.plugins.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["hookimpl", "__version__"]
