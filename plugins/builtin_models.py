"""Built-in model architectures and the slim sub-network's auxiliary loss, registered through the public hooks."""

from dataselect.hookspecs import hookimpl
from dataselect.models import BUILTIN_MODELS
from dataselect.names import SLIM_PROXY
from dataselect.proxy import slim_proxy_loss


@hookimpl
def register_models(register):
    for name, cls in BUILTIN_MODELS.items():
        register(name, cls)


@hookimpl
def register_auxiliary_losses(register):
    register(SLIM_PROXY, slim_proxy_loss)
