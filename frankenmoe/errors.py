"""One exception family for everything the user can get wrong, each kind with its exit code."""

from __future__ import annotations


class FrankenMoEError(Exception):
    """An error the user can act on; the CLI prints `message` without a traceback."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(FrankenMoEError):
    """The merge configuration is malformed or asks for something impossible."""

    exit_code = 2
    kind = "config error"


class ModelError(FrankenMoEError):
    """A source model is missing, unreadable, unsupported or incompatible with the others."""

    exit_code = 3
    kind = "model error"


class OutputError(FrankenMoEError):
    """Writing the output failed or would fail: disk space, permissions, an existing folder."""

    exit_code = 4
    kind = "I/O error"


class MergeInterruptedError(FrankenMoEError):
    """The user pressed Ctrl-C; partial output has been removed."""

    exit_code = 130
    kind = "interrupted"


class InternalError(FrankenMoEError):
    """An exception frankenmoe did not anticipate (a bug), reported as an error event under --log-format json."""

    exit_code = 1
    kind = "internal error"
