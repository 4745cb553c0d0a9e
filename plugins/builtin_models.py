"""Built-in model architectures, registered through the public hook."""

from dataselect.hookspecs import hookimpl
from dataselect.models import BUILTIN_MODELS


@hookimpl
def register_models(register):
    for name, cls in BUILTIN_MODELS.items():
        register(name, cls)
