"""`dataselect-server`: run the scoring service until Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging

import click

from dataselect.errors import DataselectError
from dataselect.names import DEFAULT_MAX_MESSAGE_MB, PRECISIONS, parse_micro_batch

#: Defaults for --malloc-arena-max and --malloc-mmap-threshold-kb (benchmarks/load_test.py --memory-variants
#: measures them against glibc's defaults).
MALLOC_ARENAS = 2
MALLOC_MMAP_THRESHOLD_KB = 1024


class MicroBatch(click.ParamType):
    """'auto' or a positive integer."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        try:
            return parse_micro_batch(value)
        except DataselectError as exc:
            self.fail(str(exc), param, ctx)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for all interfaces).")
@click.option("--port", default=50051, show_default=True, type=click.IntRange(0, 65535), help="Port; 0 picks a free one.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--max-message-mb", default=DEFAULT_MAX_MESSAGE_MB, show_default=True, type=click.IntRange(1, 2047),
              help="Largest gRPC message accepted or sent, in MiB (clients should use the same).")
@click.option("--micro-batch", default="auto", show_default=True, type=MicroBatch(),
              help="Samples per scoring forward pass; auto sizes it from free GPU memory (1024 off CUDA).")
@click.option("--precision", default="auto", show_default=True,
              type=click.Choice(PRECISIONS, case_sensitive=False),
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
def main(**options) -> None:
    """Serve dataselect.v1.Selection: score candidate pools for dataselect-train."""
    logging.basicConfig(level=options["log_level"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The command's one deferred import: torch and grpc load once the arguments have parsed, so --help and
    # argument errors stay fast (benchmarks/bench_startup.py).
    from dataselect.server.app import run_until_stopped

    run_until_stopped(**options)


if __name__ == "__main__":
    main()
