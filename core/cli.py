"""How every dataselect console script runs: `run_command` turns usage errors and
`DataselectError`s into one line `error: ...` on stderr and a non-zero exit, never a
traceback, so errors look the same in `dataselect`, `dataselect-train` and
`dataselect-server`. (The `dataselect` command itself is `dataselect.client.main`.)
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from dataselect.errors import DataselectError


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error and exit."""
    one_line = "; ".join(part.strip() for part in str(message).splitlines() if part.strip()) or "failed"
    click.echo(f"error: {one_line}", err=True)
    sys.exit(code)


def run_command(command: click.Command, args: list[str] | None = None, prog_name: str | None = None) -> NoReturn:
    """Run a click command, turning usage errors and DataselectErrors into one `error:` line."""
    prog = prog_name or command.name
    try:
        rv = command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.UsageError as exc:
        fail(f"{exc.format_message()} (see {prog} --help)", exc.exit_code)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        fail("aborted", 130)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except DataselectError as exc:
        fail(str(exc), 1)
    sys.exit(rv if isinstance(rv, int) else 0)
