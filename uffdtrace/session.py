"""A tracing session: backend -> assembler -> sinks, drained on a timer until told to stop.

Data flows one way. A thread of its own empties the ring buffer into a bounded backlog, so a
sink that stalls (a disk in writeback) delays rows instead of losing them; past the backlog,
the ring fills and the kernel side counts what it could not submit. A sink whose write fails
(OSError: a full disk, a closed pipe) stops the session: nothing more is written anywhere, and
the error is kept in `write_error`. The session owns clean-up: BPF programs are detached, kernel
settings restored and then the sinks closed (plugins get a deadline there, with BPF already
detached) on every way out (end of command, duration, Ctrl-C, SIGTERM, a write failure).
"""

from __future__ import annotations

import os
import queue
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from uffdtrace.events import BlockedFault, Status
from uffdtrace.pipeline import Assembler, Batch
from uffdtrace.probes.backends import Backend, resolve
from uffdtrace.probes.bpfstats import BpfStats
from uffdtrace.probes.records import ROLE_HANDLER
from uffdtrace.probes.tracepoint import TraceScope
from uffdtrace.sinks import IoctlSink, Sink
from uffdtrace.stats import StatsFeed
from uffdtrace.summary import FaultStats
from uffdtrace.targets import LaunchedCommand, uffd_holders, uffd_inodes, uffd_ranges

DRAIN_INTERVAL_S = 0.05
# Drained records are assembled this often, or as soon as FEED_RECORDS wait: each batch costs
# pandas and Arrow a fixed overhead, which small batches would pay per fault.
FEED_INTERVAL_S = 0.25
FEED_RECORDS = 100_000
RESCAN_INTERVAL_S = 1.0  # new handler processes, faults blocked now
STUCK_AFTER_S = 1.0  # a fault blocked this long is reported while the session runs
BACKLOG_RECORDS = 2_000_000  # drained, not yet assembled (~270 MB): beyond it the ring fills


@dataclass
class Session:
    mode: str
    scope: TraceScope
    sinks: list[Sink]
    backend_class: type[Backend] | None = None  # None: what `--backend auto` picks
    vcpus: dict[int, int] = field(default_factory=dict)  # tid -> QEMU vCPU index (from QMP)
    stats: FaultStats = field(default_factory=FaultStats)
    startup_s: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _bpf_stats: BpfStats = field(default_factory=BpfStats)
    backend: Backend | None = None
    blocked: list[BlockedFault] = field(default_factory=list)  # as of the last scan, oldest first
    on_stuck: Callable[[BlockedFault, float], None] | None = None  # once per fault blocked too long
    write_error: OSError | None = None  # the first failed write of a sink: tracing stopped there
    _reported_stuck: set[tuple[int, int]] = field(default_factory=set)
    feed: StatsFeed | None = None  # --mode stats: what keeps the in-kernel aggregates (top, export)

    def start(self) -> None:
        t0 = time.monotonic()
        self._cpu0 = _cpu_s()
        self._me = os.getpid()
        self._wall0 = t0
        self._bpf_stats.enable()
        backend = (self.backend_class or resolve("auto"))(self.mode, self.scope)
        backend.start()
        self.backend = backend
        self._add_handlers()
        self.ranges_at_start = [r for pid in self.scope.pids for r in uffd_ranges(pid)]
        self.assembler = Assembler(self.backend.paths(), self.backend.sees_ioctls(),
                                   vcpus=self.vcpus)
        self.startup_s = time.monotonic() - t0

    def _add_handlers(self) -> None:
        """Processes that hold a traced process's userfaultfd are its handlers: trace them too.
        (Discovered processes' handlers join from BPF: no /proc scan on a busy host.)"""
        if self.scope.all or self.scope.discover:
            return
        known = self.backend.tracked()
        inodes = set().union(*(uffd_inodes(p) for p in known))
        for pid in uffd_holders(inodes) - known.keys():
            self.backend.track(pid, role=ROLE_HANDLER)

    def stop(self) -> None:
        self._stop.set()

    @property
    def ending(self) -> bool:
        """Told to stop, or run() is over: the session is on its way out."""
        return self._stop.is_set()

    def run(self, until: Callable[[], bool] = lambda: False, duration_s: float | None = None) -> None:
        """Assemble and write until stop(), `until()` or the duration; then what is left."""
        deadline = None if duration_s is None else time.monotonic() + duration_s
        next_scan = time.monotonic() + RESCAN_INTERVAL_S
        next_feed = time.monotonic() + FEED_INTERVAL_S
        backlog, stop_draining = _Backlog(), threading.Event()
        drainer = threading.Thread(target=self._drain, args=(backlog, stop_draining),
                                   name="uffdtrace-drain", daemon=True)
        drainer.start()
        try:
            while not self._stop.is_set():
                if until() or (deadline is not None and time.monotonic() >= deadline):
                    break
                self._stop.wait(DRAIN_INTERVAL_S)
                if backlog.records >= FEED_RECORDS or time.monotonic() >= next_feed:
                    batch = backlog.take()
                    if batch is not None:
                        self._feed(batch)
                    next_feed = time.monotonic() + FEED_INTERVAL_S
                if time.monotonic() >= next_scan:
                    self._add_handlers()
                    self._scan_blocked()
                    next_scan = time.monotonic() + RESCAN_INTERVAL_S
        finally:
            self._stop.set()
            stop_draining.set()
            drainer.join()
        if backlog.error is not None:
            raise backlog.error
        rest = backlog.take()
        if rest is not None:
            self._feed(rest)
        self.poll()

    def status(self) -> Status:
        """Where the running session stands (for a status line)."""
        run_ns, runs = self.backend.run_stats()
        faults = sum(self.feed.aggregates.faults_by_path().values()) if self.feed else self.stats.faults
        return Status(self.backend.name, self.mode, faults, sum(self.backend.lost().values()),
                      run_ns, runs, time.process_time(), time.monotonic(), tuple(self.blocked))

    def _scan_blocked(self) -> None:
        self.blocked = self.backend.blocked_now()
        if self.on_stuck is None:
            return
        now = time.monotonic_ns()
        for fault in self.blocked:
            age_s = (now - fault.fault_ns) / 1e9
            if age_s >= STUCK_AFTER_S and (fault.tid, fault.fault_ns) not in self._reported_stuck:
                self._reported_stuck.add((fault.tid, fault.fault_ns))
                self.on_stuck(fault, age_s)

    def _drain(self, backlog: _Backlog, done: threading.Event) -> None:
        try:
            while not done.wait(DRAIN_INTERVAL_S):
                if backlog.records < BACKLOG_RECORDS:
                    backlog.put(self.backend.drain())
        except Exception as e:  # handed to the assembling thread, which ends the session
            backlog.error = e
            self._stop.set()

    def poll(self) -> None:
        self._feed(self.backend.drain())

    def _feed(self, raw: np.ndarray) -> None:
        ours = raw["pid"] == self._me  # never trace ourselves
        self._emit(self.assembler.feed(raw[~ours] if ours.any() else raw))

    def _emit(self, batch: Batch) -> None:
        if self.write_error is not None:
            return
        try:
            if not batch.ioctls.empty:
                for sink in self.sinks:
                    if isinstance(sink, IoctlSink):
                        sink.write_ioctls(batch.ioctls)
            if batch.faults.empty:
                return
            for sink in self.sinks:
                sink.write(batch.faults)
            self.stats.write(batch.faults)  # after the sinks: the rows of a failed write are not counted
        except OSError as e:
            self.write_error = e
            self._stop.set()

    def close(self) -> dict:
        """Flush (unless a write failed), detach, restore, then close the sinks; return the
        summary's tracer-side numbers."""
        self._stop.set()
        info: dict = {}
        try:
            if self.backend is not None:
                if self.write_error is None:
                    self.poll()
                    self._emit(self.assembler.feed(self.backend.faults_in_flight()))
                    self._emit(self.assembler.finish())
                if self.feed is not None:  # the last counts, for the summary
                    self.feed.tick(now=True)
                    self.stats.counts = self.feed.aggregates.faults_by_path()
                info = self._tracer_info()
        finally:
            if self.backend is not None:
                self.backend.close()
            self._bpf_stats.restore()
            self._close_sinks()
        info["tracer_cpu_s"] = _cpu_s() - self._cpu0
        info["wall_s"] = time.monotonic() - self._wall0
        return info

    def _tracer_info(self) -> dict:
        run_ns, run_cnt = self.backend.run_stats()
        return {
            "lost": self.backend.lost(),
            "stall_hist": self.backend.histogram("stall").tolist(),
            "continue_hist": self.backend.histogram("continue").tolist(),
            "bpf_run_ns": run_ns,
            "bpf_run_cnt": run_cnt,
            "uffd_events": self.backend.uffd_event_counts(),
            "registers": self.assembler.register_ranges,
            "ranges_at_start": self.ranges_at_start,
            "ioctls": self.assembler.ioctl_counts,
            "messages": self.backend.loose_messages(),
        }

    def _close_sinks(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except OSError as e:  # e.g. plugin tables written to a full disk
                self.write_error = self.write_error or e


class _Backlog:
    """Drained record batches, handed from the drain thread to the assembling one."""

    def __init__(self) -> None:
        self._batches: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self._put = 0  # records; each counter is written by one thread only
        self._taken = 0
        self.error: Exception | None = None

    @property
    def records(self) -> int:
        return self._put - self._taken

    def put(self, batch: np.ndarray) -> None:
        if len(batch):
            self._put += len(batch)
            self._batches.put(batch)

    def take(self) -> np.ndarray | None:
        """Everything drained so far, in order, as one batch (None: nothing)."""
        batches = []
        while True:
            try:
                batches.append(self._batches.get_nowait())
            except queue.Empty:
                break
        if not batches:
            return None
        self._taken += sum(len(b) for b in batches)
        return np.concatenate(batches)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def stop_on_signals(session: Session, launched: LaunchedCommand | None = None) -> None:
    """Ctrl-C, SIGTERM and SIGHUP end the session cleanly instead of killing it mid-write. One
    more, once it is ending (signalled, or its command over), exits at once, with the command
    sent SIGTERM as on a clean stop: the kernel detaches the BPF programs when their fds close
    with the process, and rows are written whole, so nothing is left half-done."""
    def handle(signum: int, _frame: object) -> None:
        if session.ending:
            os.write(sys.stderr.fileno(), b"uffdtrace: signal while ending: exiting at once\n")
            if launched:
                launched.terminate()
            os._exit(128 + signum)
        session.stop()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handle)
