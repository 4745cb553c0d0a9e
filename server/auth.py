"""Bearer-token authentication: the one interceptor that checks the token.

With tokens configured (`--token-file`, one token per line, or env
`DATASELECT_TOKEN`), every RPC except the health checks needs the metadata
`authorization: Bearer <token>`; a missing or wrong token is UNAUTHENTICATED.
Reflection needs the token too: it describes the API, which is nobody's
business without one. Tokens are compared with `hmac.compare_digest` against
every configured token, so the time taken says nothing about which one (or
how much of one) matched.

Each token is also an identity: a session belongs to the token that opened it
(see `SessionStore`), so trainers holding different tokens cannot use each
other's sessions even with a leaked session id.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Iterable, Sequence

import grpc

from dataselect.errors import InvalidArgument

TOKEN_ENV = "DATASELECT_TOKEN"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def read_tokens(path: str | Path | None = None, *, env: bool = True) -> list[str]:
    """Tokens from a file (one per line; blank lines and '#' comments ignored), else from $DATASELECT_TOKEN."""
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise InvalidArgument(f"cannot read token file {p}: {exc.strerror or exc}") from None
        tokens = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
        if not tokens:
            raise InvalidArgument(f"token file {p} holds no token; write one token per line")
        return tokens
    value = os.environ.get(TOKEN_ENV, "").strip() if env else ""
    return [value] if value else []


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            value = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def principal_of(context: grpc.ServicerContext, enabled: bool) -> str:
    """Who is calling: a digest of the bearer token ('' when the server needs none)."""
    if not enabled:
        return ""
    token = bearer_token(context.invocation_metadata()) or ""
    return hashlib.sha256(token.encode()).hexdigest()


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, tokens: Sequence[str]):
        self._tokens = [t.encode() for t in tokens]

    def _allowed(self, token: str | None) -> bool:
        if token is None:
            return False
        given = token.encode()
        ok = False
        for expected in self._tokens:  # no early exit: every token is compared
            ok |= hmac.compare_digest(given, expected)
        return ok

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not self._tokens or method.startswith(OPEN_PREFIXES):
            return continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        handler = continuation(handler_call_details)
        if self._allowed(token) or handler is None:
            return handler
        message = ("missing token: send the metadata 'authorization: Bearer <token>' (dataselect-train --token-file)"
                   if token is None else "wrong token: use a token listed in the server's --token-file")
        return _denying(handler, message)


def _denying(handler, message: str):
    def deny(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def deny_stream(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    for kind in ("unary_unary", "stream_unary"):
        if getattr(handler, kind) is not None:
            return handler._replace(**{kind: deny})
    for kind in ("unary_stream", "stream_stream"):
        if getattr(handler, kind) is not None:
            return handler._replace(**{kind: deny_stream})
    return handler
