"""The options that `record`, `top`, `export` and `report` share, and what they turn into: the
tracing plan (targets, probes, --qmp, --ebpf) and the plugin host (--plugin, --opt)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from uffdtrace.plugins import RunContext, parse_options, resolve
from uffdtrace.probes.backends import BACKENDS
from uffdtrace.probes.tracepoint import MODES
from uffdtrace.sinks.plugins import PluginSink
from uffdtrace.tracing import Plan, plan


def add_probe_arguments(p: argparse.ArgumentParser, modes: Sequence[str] = MODES) -> None:
    """--mode (one of `modes`), --backend, --qmp, --ebpf."""
    if len(modes) > 1:
        p.add_argument("--mode", choices=modes, default="full", help="probe set (default: full)")
    else:
        p.set_defaults(mode=modes[0])
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (kprobes where the kernel has them, else tracepoints), tracepoint "
                        "or kprobe (default: auto)")
    p.add_argument("--qmp", type=Path, metavar="SOCKET",
                   help="a QEMU's QMP socket: name its vCPU threads (query-cpus-fast) in the "
                        "vcpu column, also without -name debug-threads=on")
    p.add_argument("--ebpf", action="store_true",
                   help="print the BPF program that would run, with its compile flags, and exit")


def add_target_arguments(p: argparse.ArgumentParser, pid_help: str) -> None:
    """-p PID and --all; the `-- COMMAND` positional goes last (add_command_argument)."""
    p.add_argument("-p", "--pid", type=int, action="append", default=[], metavar="PID",
                   help=pid_help)
    p.add_argument("--all", action="store_true", help="trace every process")


def add_command_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="trace COMMAND from its start, with its threads and children")


def add_plugin_arguments(parser: argparse.ArgumentParser, out_flag: str = "--plugin-out") -> None:
    """--plugin, --opt and an output-directory flag (dest: plugin_out)."""
    parser.add_argument("--plugin", action="append", default=[], metavar="NAME|PATH",
                        help="run this plugin: an installed name (see `uffdtrace plugins`) or a "
                             "file path like ./mine.py (repeatable)")
    parser.add_argument("--opt", action="append", default=[], metavar="PLUGIN.NAME=VALUE",
                        help="set a plugin option (repeatable)")
    parser.add_argument(out_flag, dest="plugin_out", type=Path, metavar="DIR",
                        help="write each plugin table as DIR/<plugin>_<table>.csv")


def plugin_sink_from_args(args: argparse.Namespace, ctx: RunContext,
                          default: Sequence[str] = (),
                          stream: TextIO | None = None) -> PluginSink:
    """The host for `--plugin` (or `default` when none is given) with its `--opt`s; tables
    go to --plugin-out and, as text, to `stream`."""
    infos = resolve(args.plugin or list(default))
    return PluginSink(infos, ctx, parse_options(args.opt, infos),
                      out_dir=args.plugin_out, stream=stream)


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The tracing plan of `record` or `top`, from their options."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return plan(args.pid, command, args.all, args.mode, args.backend, args.qmp)


def print_program(plan: Plan, out: TextIO = sys.stdout) -> None:
    """--ebpf: the program the plan's backend would compile, after its compile flags."""
    backend = plan.backend(plan.mode, plan.scope())
    print("// cflags: " + " ".join(backend.cflags()), file=out)
    print(backend.source(), file=out)
