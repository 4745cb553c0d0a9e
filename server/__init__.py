"""The scoring service: `dataselect-server`.

`serve()` builds the gRPC server (used by the CLI and by the tests alike);
`SelectionServicer` implements `dataselect.v1.Selection` over a
`SessionStore` of `dataselect.scoring.ScoringSession`s. The exports load on
first use, so `dataselect-server --help` answers without importing torch or grpc.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["AddressInUse", "RunningServer", "serve"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'dataselect.server' has no attribute {name!r}")
    value = getattr(importlib.import_module("dataselect.server.app"), name)
    globals()[name] = value
    return value
