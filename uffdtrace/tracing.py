"""The one orchestration path of every command that traces (`record`, `top`, `export`): choose the
targets and resolve the backend once, launch the command, run the session, close it and
summarise. Commands choose their sinks and how the session is driven (a loop, or a screen)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from uffdtrace.errors import UserError
from uffdtrace.plugins import RunContext
from uffdtrace.probes.backends import Backend, resolve
from uffdtrace.probes.checks import import_bcc
from uffdtrace.probes.tracepoint import TraceScope
from uffdtrace.qmp import vcpu_threads
from uffdtrace.session import Session, stop_on_signals
from uffdtrace.sinks import Sink
from uffdtrace.summary import build_summary
from uffdtrace.targets import LaunchedCommand, alive, check_pids, uffd_inodes


@dataclass(frozen=True)
class Plan:
    """What to trace and how, checked before anything starts."""

    mode: str
    backend: type[Backend]  # resolved once, for the run and for what plugins are told
    pids: tuple[int, ...] = ()
    command: tuple[str, ...] = ()
    all: bool = False
    vcpus: dict[int, int] = field(default_factory=dict)  # tid -> QEMU vCPU index (--qmp)
    discover: bool = False  # every process that sets up a userfaultfd (export)
    per_thread: bool = False  # stats mode: aggregates per thread (the vcpu label)

    def context(self, **extra) -> RunContext:
        """What plugins are told about the run."""
        targets = tuple(f"pid {p}" for p in self.pids) or (
            " ".join(self.command) or ("userfaultfd users" if self.discover else "all"),)
        return RunContext(targets=targets, backend=self.backend.name, mode=self.mode, **extra)

    def scope(self, launched_pid: int | None = None) -> TraceScope:
        """What the BPF programs look at: the pids, every process, or the command's process
        and its children."""
        return TraceScope(pids=self.pids + ((launched_pid,) if launched_pid else ()), all=self.all,
                          follow_children=bool(self.command), discover=self.discover,
                          per_thread=self.per_thread)

    def describe(self) -> str:
        if self.command:
            return f"command {' '.join(self.command)}"
        if self.discover:
            return "every process that sets up a userfaultfd"
        return "all processes" if self.all else "pid " + ", ".join(map(str, self.pids))


def plan(pids: list[int], command: list[str], all_: bool, mode: str, backend: str,
         qmp: Path | None = None, discover: bool = False, per_thread: bool = False) -> Plan:
    """The checked plan: exactly one kind of target, live pids (warned about when they hold no
    userfaultfd yet), a backend this kernel can run, and the vCPUs that QMP names."""
    if sum([bool(pids), all_, bool(command), discover]) != 1:
        raise UserError("choose exactly one target: -p PID, --all, or -- COMMAND")
    bcc, check = import_bcc()  # Debian's python3-bpfcc, as `doctor` checks it
    if bcc is None:
        raise UserError(f"{check.detail}: {check.fix}")
    pids = check_pids(pids)
    for pid in pids:
        if not uffd_inodes(pid):
            print(f"uffdtrace: pid {pid} holds no userfaultfd now: its faults show once it opens one",
                  file=sys.stderr)
    vcpus = vcpu_threads(qmp) if qmp is not None else {}
    return Plan(mode, resolve(backend), tuple(pids), tuple(command), all_, vcpus, discover, per_thread)


@dataclass(frozen=True)
class Outcome:
    summary: dict
    write_error: OSError | None  # the write that stopped tracing, if one did


Drive = Callable[[Session, Callable[[], bool]], None]  # run the started session until the predicate


def trace(plan: Plan, sinks: list[Sink], drive: Drive, *,
          launch: Callable[[list[str]], LaunchedCommand] = LaunchedCommand,
          started: Callable[[Session], None] = lambda _: None,
          on_stuck: Callable | None = None) -> Outcome:
    """Launch the command (held until tracing starts), start the session on `sinks`, hand it
    to `drive` with the end condition (the command ended, or every pid has), then close it:
    BPF detached, sinks closed, the summary built. `started` runs once tracing has begun (it
    may refuse the run: the session is closed all the same)."""
    launched = launch(list(plan.command)) if plan.command else None
    session = Session(plan.mode, plan.scope(launched.pid if launched else None), sinks,
                      plan.backend, vcpus=plan.vcpus)
    session.on_stuck = on_stuck
    stop_on_signals(session, launched)

    def ended() -> bool:
        if launched:
            return launched.poll() is not None
        return bool(plan.pids) and not any(alive(p) for p in plan.pids)

    try:
        session.start()
        started(session)
        if launched:
            launched.release()
        drive(session, ended)
    finally:
        if launched and launched.poll() is None and session.write_error is None:
            launched.terminate()
            launched.wait()
        info = session.close()
    if session.write_error is not None:
        failed_write(session.write_error)
        if launched:
            launched.wait()  # a tracer must not break what it traces: it runs on, untraced
    return Outcome(build_summary(session, info, plan.mode, launched), session.write_error)


def failed_write(error: OSError) -> None:
    """One line for the write that stopped tracing; a dead stdout gets nothing more (not even
    Python's flush at exit)."""
    print(f"uffdtrace: writing {error.filename or 'the output'} failed: "
          f"{error.strerror or error}; stopped tracing", file=sys.stderr, flush=True)
    if error.filename == sys.stdout.name:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
