"""`dataselect-server`: run the scoring service until Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from dataselect.errors import DataselectError

log = logging.getLogger("dataselect.server")


def _fail(message: str) -> None:
    click.echo(f"dataselect-server: error: {message}", err=True)
    sys.exit(2)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for all interfaces).")
@click.option("--port", default=50051, show_default=True, type=click.IntRange(0, 65535), help="Port; 0 picks a free one.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--max-message-mb", default=64, show_default=True, type=click.IntRange(1, 2047),
              help="Largest gRPC message accepted or sent, in MiB (clients should use the same).")
@click.option("--micro-batch", default=1024, show_default=True, type=click.IntRange(1), help="Samples per scoring forward pass.")
@click.option("--workers", default=8, show_default=True, type=click.IntRange(1), help="Threads serving RPCs.")
@click.option("--grace-seconds", default=10.0, show_default=True, type=click.FloatRange(0),
              help="On shutdown, how long calls in flight may finish.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0),
              help="Calls that may wait for a scoring worker; more get RESOURCE_EXHAUSTED at once.")
@click.option("--max-sessions", default=64, show_default=True, type=click.IntRange(1), help="Open sessions at most.")
@click.option("--session-ttl", default=3600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Close sessions idle for this many seconds.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="File of accepted tokens, one per line (default: env DATASELECT_TOKEN). Every call but health "
                   "checks then needs 'authorization: Bearer <token>'.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None, help="PEM certificate chain: serve TLS.")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None, help="PEM private key for --tls-cert.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Let clients name checkpoint files inside this directory (nothing outside it).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
def main(host, port, device, max_message_mb, micro_batch, workers, grace_seconds, max_queue, max_sessions,
         session_ttl, token_file, tls_cert, tls_key, checkpoint_dir, log_level):
    """Serve dataselect.v1.Selection: score candidate pools for dataselect-train."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dataselect.engine import resolve_device
    from dataselect.plugins import selectors
    from dataselect.server.app import AddressInUse, serve
    from dataselect.server.auth import read_tokens

    try:
        dev = resolve_device(device)
    except DataselectError as exc:
        _fail(f"--device: {exc}")

    try:
        tokens = read_tokens(token_file)
    except DataselectError as exc:
        _fail(f"--token-file: {exc}")

    stop = threading.Event()

    def request_stop(signum, frame):
        log.info("received %s, stopping (grace %.0fs)", signal.Signals(signum).name, grace_seconds)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        with serve(host, port, device=dev, max_message_bytes=max_message_mb * 2**20, workers=workers,
                   micro_batch=micro_batch, grace_seconds=grace_seconds, max_queue=max_queue,
                   max_sessions=max_sessions, session_ttl=session_ttl, tokens=tokens, tls_cert=tls_cert,
                   tls_key=tls_key, checkpoint_dir=checkpoint_dir) as running:
            log.info("dataselect-server listening on %s (%s, %s), device %s, strategies: %s",
                     running.address, "TLS" if running.tls else "plaintext",
                     "token required" if tokens else "no token", running.device, ", ".join(selectors()))
            click.echo(f"listening on {running.address}")
            sys.stdout.flush()
            # Event.wait with a timeout keeps the main thread responsive to signals.
            while not stop.wait(0.5):
                pass
    except AddressInUse as exc:
        _fail(f"--port {port}: {exc}")
    except DataselectError as exc:
        _fail(str(exc))
    log.info("stopped")


if __name__ == "__main__":
    main()
