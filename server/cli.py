"""`dataselect-server`: run the scoring service until Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import click

from dataselect.errors import DataselectError
from dataselect.registry import selectors

log = logging.getLogger("dataselect.server")
#: Defaults for --malloc-arena-max and --malloc-mmap-threshold-kb (benchmarks/load_test.py --memory-variants
#: measures them against glibc's defaults).
MALLOC_ARENAS = 2
MALLOC_MMAP_THRESHOLD_KB = 1024


def _fail(message: str) -> None:
    click.echo(f"dataselect-server: error: {message}", err=True)
    sys.exit(2)


class MicroBatch(click.ParamType):
    """'auto' or a positive integer."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        from dataselect.engine import parse_micro_batch

        try:
            return parse_micro_batch(value)
        except DataselectError as exc:
            self.fail(str(exc), param, ctx)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for all interfaces).")
@click.option("--port", default=50051, show_default=True, type=click.IntRange(0, 65535), help="Port; 0 picks a free one.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--max-message-mb", default=64, show_default=True, type=click.IntRange(1, 2047),
              help="Largest gRPC message accepted or sent, in MiB (clients should use the same).")
@click.option("--micro-batch", default="auto", show_default=True, type=MicroBatch(),
              help="Samples per scoring forward pass; auto sizes it from free GPU memory (1024 off CUDA).")
@click.option("--precision", default="auto", show_default=True,
              type=click.Choice(["auto", "fp32", "bf16", "fp16"], case_sensitive=False),
              help="Autocast dtype for forward-only signals (losses and margins stay float32; gradient "
                   "signals always run in fp32); auto = bf16 on CUDA if supported, else fp32.")
@click.option("--channels-last", default="auto", show_default=True, type=click.Choice(["auto", "on", "off"]),
              help="Score in channels-last memory format; auto = on for CUDA and CPU.")
@click.option("--compile/--no-compile", "compile_model", default=False, show_default=True,
              help="torch.compile the scoring model's forward (slow first call; eager with a warning if it fails).")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads for torch (default: torch's choice).")
@click.option("--workers", default=8, show_default=True, type=click.IntRange(1), help="Threads serving RPCs.")
@click.option("--grace-seconds", default=10.0, show_default=True, type=click.FloatRange(0),
              help="On SIGTERM/Ctrl-C: health turns NOT_SERVING and new calls are refused, calls in flight get "
                   "this long to finish, then they are cancelled and the process exits.")
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
@click.option("--stream-idle-seconds", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="End a client stream (SelectStream, UploadCheckpoint) that sends nothing for this long.")
@click.option("--session-memory-mb", default=2048, show_default=True, type=click.IntRange(1),
              help="Model state one session may hold (the model's parameters and buffers), in MiB.")
@click.option("--memory-budget-mb", default=None, type=click.IntRange(1),
              help="Model state all sessions together may hold, in MiB [default: half the physical memory].")
@click.option("--malloc-arena-max", default=MALLOC_ARENAS, show_default=True, type=click.IntRange(0),
              help="Cap glibc's malloc arenas (fewer arenas: less memory held after load; 0 = glibc's default).")
@click.option("--malloc-mmap-threshold-kb", default=MALLOC_MMAP_THRESHOLD_KB, show_default=True,
              type=click.IntRange(0, 32 * 1024),
              help="Blocks from this size are mmapped and handed back when freed; fixing it also stops glibc "
                   "from growing it (and the arenas with it) after bursts (0 = glibc's adaptive default).")
@click.option("--trim-memory/--no-trim-memory", default=True, show_default=True,
              help="Hand freed memory back to the OS (malloc_trim) after sessions close.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
def main(host, port, device, max_message_mb, micro_batch, precision, channels_last, compile_model, threads, workers,
         grace_seconds, max_queue, max_sessions, session_ttl, token_file, tls_cert, tls_key, checkpoint_dir,
         stream_idle_seconds, session_memory_mb, memory_budget_mb, malloc_arena_max, malloc_mmap_threshold_kb,
         trim_memory, log_level):
    """Serve dataselect.v1.Selection: score candidate pools for dataselect-train."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dataselect.server.sessions import tune_malloc

    tune_malloc(malloc_arena_max, malloc_mmap_threshold_kb * 1024)  # before the RPC threads start allocating
    from dataselect.engine import resolve_device, resolve_precision
    from dataselect.server.app import AddressInUse, serve
    from dataselect.server.auth import read_tokens

    try:
        dev = resolve_device(device)
    except DataselectError as exc:
        _fail(f"--device: {exc}")
    try:
        resolve_precision(precision, dev)
    except DataselectError as exc:
        _fail(f"--precision: {exc}")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)

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
                   tls_key=tls_key, checkpoint_dir=checkpoint_dir, precision=precision.lower(),
                   channels_last=channels_last, compile=compile_model, stream_idle_seconds=stream_idle_seconds,
                   session_memory=session_memory_mb * 2**20,
                   memory_budget="auto" if memory_budget_mb is None else memory_budget_mb * 2**20,
                   trim_memory=trim_memory) as running:
            log.info("dataselect-server listening on %s (%s, %s), device %s, strategies: %s",
                     running.address, "TLS" if running.tls else "plaintext",
                     "token required" if tokens else "no token", running.device, ", ".join(selectors()))
            log.info("scoring engine: micro-batch %s, precision %s, channels-last %s, compile %s",
                     micro_batch, precision, channels_last, "on" if compile_model else "off")
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
    _exit_now_if_stuck(running.limit.in_flight if running.limit is not None else 0)


def _exit_now_if_stuck(calls: int) -> None:
    """Exit at once when calls are still stuck past the grace period (e.g. inside a plugin that ignores
    cancellation): Python would otherwise wait for their worker threads before exiting."""
    if not calls:
        return
    log.warning("exiting with %d call(s) still running past the grace period", calls)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
