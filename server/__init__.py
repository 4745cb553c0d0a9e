"""The scoring service: `dataselect-server`.

`serve()` builds the gRPC server (used by the CLI and by the tests alike);
`SelectionServicer` implements `dataselect.v1.Selection` over a
`SessionStore` of `dataselect.scoring.ScoringSession`s.
"""

from dataselect.server.app import AddressInUse, RunningServer, serve

__all__ = ["AddressInUse", "RunningServer", "serve"]
