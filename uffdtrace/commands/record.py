"""Record every userfaultfd fault of the traced processes: one CSV row per fault (Parquet for
-o FILE.parquet: the same columns, typed).

Each row is one fault from touch to resume (columns in README.md). Times are CLOCK_MONOTONIC
ns; empty cells are what this mode cannot know. A summary follows on stderr (or --json on
stdout): counts by backing x kind, stall and CONTINUE percentiles, lost events, the tracer's
own cost.

stopping: Ctrl-C, SIGTERM or the command's end detach BPF, then plugins get 2 s in total to
catch up (a plugin still busy then gives no tables); a second signal exits at once. A failed
write (full disk, closed pipe) stops tracing: the CSV ends at its last complete row (a
Parquet file at its last complete row group, then its footer), the command runs on untraced and
is waited for, the summary is printed, and the exit status is 1. A Parquet file is readable
only once its footer is written, on the way out: one killed with SIGKILL or by a second signal
is not.

modes:
  light   the scheduler and fault tracepoints, and handlers' message reads (raw sys_exit);
          no ioctls, so resolver, continue_ns, handler_ns, errno and mapped stay empty
  full    adds raw sys_enter for every uffd ioctl: every column, and one row per ioctl with
          --ioctls
  (--mode stats keeps no rows: see `uffdtrace top --mode stats` and `uffdtrace export`)

examples:
  uffdtrace record -o faults.csv -- uffdtrace exercise --pages 20000
  uffdtrace record -o faults.csv --ioctls ioctls.csv -p 4242
  uffdtrace record -o vm.parquet --ioctls io.parquet -p 4242   # Parquet: by the suffix
  uffdtrace record -p 4242 --duration 10 --mode light -o vm.csv
  uffdtrace record --all -d 5 --json > summary.json
  uffdtrace record -p "$(pgrep -f 'name dst')" --qmp /run/dst.qmp -o vm.csv --ioctls io.csv
  uffdtrace record --ebpf -- true          # print the BPF program and its flags, and exit
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from uffdtrace.commands.options import (
    add_command_argument,
    add_plugin_arguments,
    add_probe_arguments,
    add_target_arguments,
    plan_from_args,
    plugin_sink_from_args,
    print_program,
)
from uffdtrace.errors import UserError
from uffdtrace.events import BlockedFault
from uffdtrace.session import Session
from uffdtrace.sinks.csv import CsvSink, IoctlCsvSink
from uffdtrace.sinks.parquet import IoctlParquetSink, ParquetSink, is_parquet
from uffdtrace.summary import print_summary
from uffdtrace.tracing import trace


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", metavar="FILE",
                   help="per-fault rows: CSV, or Parquet for a name ending in .parquet (same "
                        "columns, typed; for recordings too big for a CSV). Default, or -: CSV "
                        "on stdout (Parquet only goes to a file)")
    p.add_argument("--ioctls", metavar="FILE",
                   help="also write one row per uffd ioctl of the traced processes (full mode, "
                        "or any mode of the kprobe and fentry backends): "
                        "REGISTER, COPY, CONTINUE, WAKE... with range, mode, return value, errno, "
                        "mapped bytes, duration and the faults it woke; Parquet for a name "
                        "ending in .parquet")
    p.add_argument("-d", "--duration", type=float, metavar="S",
                   help="stop after S seconds (default: until Ctrl-C or the command ends)")
    add_probe_arguments(p, modes=("light", "full"))  # stats mode keeps no rows: `top`, `export`
    add_target_arguments(p, "trace this process and all its threads (repeatable); ends when "
                            "they all have")
    p.add_argument("-j", "--json", action="store_true", help="summary as JSON on stdout")
    add_plugin_arguments(p)
    add_command_argument(p)


def run(args: argparse.Namespace) -> int:
    if args.duration is not None and not 0 < args.duration < math.inf:
        raise UserError("--duration must be a positive number of seconds")
    to_stdout = args.output in (None, "-")
    if args.json and to_stdout:
        raise UserError("--json prints the summary on stdout: give the CSV a file with -o")
    plan = plan_from_args(args)
    if args.ebpf:
        print_program(plan)
        return 0
    plugin_sink = plugin_sink_from_args(args, plan.context(), stream=sys.stderr) if args.plugin else None
    sinks = []
    try:
        sinks.append(CsvSink(None, stream=sys.stdout) if to_stdout
                     else (ParquetSink if is_parquet(args.output) else CsvSink)(args.output))
        if args.ioctls:
            sinks.append((IoctlParquetSink if is_parquet(args.ioctls) else IoctlCsvSink)(args.ioctls))
    except OSError as e:
        for sink in sinks:
            sink.close()
        raise UserError(f"cannot write {e.filename}: {e.strerror}") from e

    def started(session: Session) -> None:
        if args.ioctls and not session.backend.sees_ioctls():
            raise UserError(f"--ioctls: the {session.backend.name} backend does not trace ioctls "
                            f"in {args.mode} mode (use --mode full)")
        print(f"uffdtrace: tracing {plan.describe()} ({session.backend.name} backend, {args.mode} "
              f"mode), started in {session.startup_s:.2f} s; Ctrl-C to stop", file=sys.stderr)

    outcome = trace(plan, [*sinks, *([plugin_sink] if plugin_sink else [])],
                    lambda session, ended: session.run(until=ended, duration_s=args.duration),
                    started=started, on_stuck=warn_stuck)
    if args.json:
        json.dump(outcome.summary, sys.stdout, indent=2)
        print()
    else:
        print_summary(outcome.summary, sys.stderr)
    incomplete = plugin_sink and (plugin_sink.failed or plugin_sink.cut)
    return 1 if outcome.write_error or incomplete else 0


def warn_stuck(fault: BlockedFault, age_s: float) -> None:
    print(f"uffdtrace: a fault has been blocked for {age_s:.1f} s: pid {fault.pid} tid {fault.tid} "
          f"address {fault.addr:#x} (is its handler alive?)", file=sys.stderr, flush=True)
