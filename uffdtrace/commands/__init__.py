"""Subcommands of `uffdtrace`: one module each (see uffdtrace.cli)."""
