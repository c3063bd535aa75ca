"""What `record` and `top` share: which processes to trace, and with which probes."""

from __future__ import annotations

import argparse

from uffdtrace.errors import UserError
from uffdtrace.plugins import RunContext
from uffdtrace.probes.backends import BACKENDS, resolve
from uffdtrace.probes.tracepoint import MODES


def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=MODES, default="full", help="probe set (default: full)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (kprobes where the kernel has them, else tracepoints), tracepoint "
                        "or kprobe (default: auto)")


def add_target_arguments(p: argparse.ArgumentParser, pid_help: str) -> None:
    """-p PID and --all; the `-- COMMAND` positional goes last (add_command_argument)."""
    p.add_argument("-p", "--pid", type=int, action="append", default=[], metavar="PID",
                   help=pid_help)
    p.add_argument("--all", action="store_true", help="trace every process")


def add_command_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="trace COMMAND from its start, with its threads and children")


def chosen_command(args: argparse.Namespace) -> list[str]:
    """The command after `--` (may be empty), once exactly one target was chosen."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if sum([bool(args.pid), args.all, bool(command)]) != 1:
        raise UserError("choose exactly one target: -p PID, --all, or -- COMMAND")
    return command


def run_context(pids: list[int], command: list[str], mode: str, backend: str, **extra) -> RunContext:
    """What plugins are told about the run (`backend` as --backend said: resolved here, so a
    backend this kernel cannot run is refused before anything starts)."""
    targets = tuple(f"pid {p}" for p in pids) or (" ".join(command) or "all",)
    return RunContext(targets=targets, backend=resolve(backend).name, mode=mode, **extra)
