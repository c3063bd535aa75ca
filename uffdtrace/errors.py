"""Errors that end a command with one clear line instead of a traceback."""


class UserError(Exception):
    """Bad input or a missing capability. The CLI prints `uffdtrace: <message>` and exits 2."""

    exit_code = 2
