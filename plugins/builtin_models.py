"""Built-in model architectures, registered through the public hook."""

from dataselect.models import BUILTIN_MODELS
from dataselect.plugins.hookspecs import hookimpl


@hookimpl
def register_models(register):
    for name, cls in BUILTIN_MODELS.items():
        register(name, cls)
