"""The `frankenmoe` command: a thin client of frankenmoe.api.

app (the typer app, global options, errors and exit codes, logging), options (every shared option,
declared once), commands (each one: parse, one API call, render) and render (text, JSON, --quiet).
"""

from __future__ import annotations

import contextlib
import os
import sys

from frankenmoe.cli import commands as _commands  # noqa: F401  (registers the commands on `app`)
from frankenmoe.cli.app import app, run_reporting_errors

__all__ = ["app", "console_main", "run_reporting_errors"]


def console_main() -> None:
    """The `frankenmoe` command (and `python -m frankenmoe`): the CLI, then an immediate exit.

    Once a command has returned, everything it wrote is closed and fsynced, and its log handler
    (a stream handler on stderr, flushed with every record) is removed; what Python's own shutdown
    would still do is run torch's finalisers, about a second of nothing. stdout and stderr are
    flushed first, and the exit code is the one the command chose. An exception that escapes the
    CLI (a bug) takes the usual path, traceback and all. Code that calls `app` itself (the tests
    do) exits normally.
    """
    try:
        app(prog_name="frankenmoe")
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can reach the reader
            stream.flush()
    os._exit(code)
