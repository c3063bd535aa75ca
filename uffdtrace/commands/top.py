"""Watch userfaultfd faults live: latency histograms, rates, threads by stall, errors.

Panels come from plugins (latency, blocktime, timeline, misuse, and any --plugin that defines
panels()). The tracer drains in a worker thread; the screen refreshes every --interval. On
quit, Ctrl-C, SIGTERM, the traced command's exit (with --hold: the q after it) or the
terminal closing, the screen is restored, BPF programs are detached and the summary of
`record` is printed. A traced command's output is held back while the screen is up and
printed before the summary.

keys: p pause/resume  r reset  m cycle metric (stall/notify/wake-to-run, continue/handler)
      l linear/log bars  o sort column  f filter tables by pid  s save snapshot CSVs  q quit

With --mode stats the panels come from histograms and counters kept in BPF (the cheapest
mode); the panels that need per-fault rows say so.

examples:
  uffdtrace top -- uffdtrace exercise --pages 200000 --cpus 0
  uffdtrace top --mode stats -p 4242
  uffdtrace top --hold -- uffdtrace migrate --bandwidth 1
  uffdtrace top -p 4242 --mode light
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from uffdtrace.commands.options import (
    add_command_argument,
    add_probe_arguments,
    add_target_arguments,
    plan_from_args,
    print_program,
)
from uffdtrace.errors import UserError
from uffdtrace.plugins import parse_options, resolve
from uffdtrace.session import Session
from uffdtrace.sinks.plugins import PluginSink
from uffdtrace.stats import Aggregates, StatsFeed, process_comm
from uffdtrace.stats_panels import StatsPanels
from uffdtrace.summary import print_summary
from uffdtrace.targets import LaunchedCommand
from uffdtrace.tracing import trace
from uffdtrace.tui import StatusLine, TopApp

PANEL_PLUGINS = ("latency", "timeline", "blocktime", "misuse", "qemu")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target_arguments(p, "trace this process and all its threads (repeatable)")
    add_probe_arguments(p)
    p.add_argument("--interval", type=float, default=0.5, metavar="S",
                   help="screen refresh period in seconds (default: 0.5)")
    p.add_argument("--snapshot-dir", type=Path, default=Path(), metavar="DIR",
                   help="where the save key writes its CSV files (default: .)")
    p.add_argument("--plugin", action="append", default=[], metavar="NAME|PATH",
                   help="also show this plugin's panels (repeatable)")
    p.add_argument("--opt", action="append", default=[], metavar="PLUGIN.NAME=VALUE",
                   help="set a plugin option (repeatable)")
    p.add_argument("--hold", action="store_true",
                   help="keep the last screen up after the traced command ends, until q")
    add_command_argument(p)


def run(args: argparse.Namespace) -> int:
    if not 0.05 <= args.interval <= 1.0:
        raise UserError("--interval must be between 0.05 and 1 s")
    plan = plan_from_args(args)
    if args.ebpf:
        print_program(plan)
        return 0
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UserError("top needs a terminal (use `uffdtrace record` otherwise)")
    errors = io.StringIO()  # plugin failures: shown in the app, printed after it
    if args.mode == "stats":  # panels from the in-kernel aggregates: no rows, so no plugins
        if args.plugin:
            raise UserError("--plugin needs per-fault rows: --mode light or full")
        host: PluginSink | StatsPanels = StatsPanels()
        sinks: list = []
    else:
        infos = resolve([*PANEL_PLUGINS, *(s for s in args.plugin if s not in PANEL_PLUGINS)])
        host = PluginSink(infos, plan.context(tables=False), parse_options(args.opt, infos),
                          tick_s=args.interval, err=errors, panels=True)
        sinks = [host]
    with tempfile.TemporaryFile() as held:  # the command's output, shown after the screen
        print("uffdtrace: starting the tracer...", file=sys.stderr)
        outcome = trace(plan, sinks, lambda session, ended: show(
            session, host, ended, hold=args.hold, interval_s=args.interval,
            snapshot_dir=args.snapshot_dir), launch=lambda command: launch(command, held.fileno()))
        with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
            held.seek(0)
            sys.stdout.flush()
            shutil.copyfileobj(held, sys.stdout.buffer)
            sys.stdout.flush()
            print(errors.getvalue(), end="", file=sys.stderr)
            print_summary(outcome.summary, sys.stderr)
    return 1 if host.failed or host.cut else 0


def show(session: Session, host: PluginSink | StatsPanels, ended: Callable[[], bool], *, hold: bool,
         interval_s: float, snapshot_dir: Path) -> None:
    """Show `host`'s panels while the started `session` runs in a worker thread, until the
    user quits, a signal (INT, TERM, HUP) arrives or `ended()` holds (the traced command
    ended); with `hold`, the last screen stays up after that until the user quits. The
    session is then stopped, not closed."""
    failure: list[BaseException] = []

    until = ended
    if isinstance(host, StatsPanels):  # the feed reads the kernel's aggregates on this thread
        paths = session.backend.paths()
        aggregates = Aggregates(("comm", "pid", "backing", "kind"), paths.of_stats_keys, process_comm)
        host.feed = session.feed = StatsFeed(session.backend, aggregates, interval_s=interval_s,
                                             every_process=session.scope.all)
        host.reset()

        def until() -> bool:
            if ended():  # one last reading: the screen held after the end shows every count
                host.feed.tick(now=True)
                return True
            return host.feed.tick()

    def run_session() -> None:
        try:
            session.run(until=until)
        except BaseException as e:  # re-raised below, once the terminal is restored
            failure.append(e)

    worker = threading.Thread(target=run_session, name="uffdtrace-session", daemon=True)
    status_line = StatusLine(session.status, lambda: sum(host.skipped_rows.values()))

    def status() -> str:  # what ended comes first: the line is cut at the terminal's width
        return status_line() if worker.is_alive() else f"ended, q quits · {status_line()}"

    app = TopApp(host, status, interval_s=interval_s,
                 done=lambda: not hold and not worker.is_alive(), snapshot_dir=snapshot_dir)
    worker.start()
    try:
        app.run()
    finally:
        session.stop()
        worker.join()
    if failure:
        raise failure[0]


def launch(command: list[str], out_fd: int) -> LaunchedCommand:
    """LaunchedCommand(command) with its stdout and stderr on `out_fd`, so that it cannot
    draw over the screen."""
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        return LaunchedCommand(command)
    finally:
        for fd, target in zip(saved, (1, 2), strict=True):
            os.dup2(fd, target)
            os.close(fd)
