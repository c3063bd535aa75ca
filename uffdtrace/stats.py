"""--mode stats in user space: the kernel's running aggregates, folded into labelled series.

BPF keeps one aggregate per (process [, thread], kernel path, kind) and per (process, ioctl,
errno), counting up from zero (records.h: struct fault_stats, struct ioctl_stats). Each
`update()` reads them whole and adds what grew since the last reading to the series of the
aggregate's labels, so the series are counters that only grow: an aggregate that goes away
(its process exited and was forgotten) leaves its counts in its series.

`StatsFeed.tick()` does it once per interval: it confirms the processes BPF discovered (they set
up a userfaultfd; a --comm pattern filters them by name), reads the aggregates, and forgets the
processes that are gone once their last counts are read.

Series are bounded: past `max_series` label sets, a new aggregate whose labels are not a series
yet is counted under the overflow set, whose comm, pid and vcpu are "other" (backing and kind
keep their few values), and counted in `dropped`. So a flood of short-lived pids costs one series, not one
each, and no count is lost.
"""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from uffdtrace.probes.backends import Backend
from uffdtrace.probes.records import (
    ROLE_DISCOVERED,
    ROLE_HANDLER,
    ROLE_PENDING_HANDLER,
    ROLE_TARGET,
    STATS_BUCKETS,
    STATS_KINDS,
    UFFD_EVENTS,
    UFFDIO_NAMES,
)
from uffdtrace.targets import alive, uffd_inodes

FAULT_LABELS = ("comm", "pid", "backing", "kind", "vcpu")
DEFAULT_LABELS = ("comm", "backing", "kind")
HISTOGRAMS = ("stall", "wake_to_run", "notify", "handler")
OVERFLOW = "other"
# Upper bounds of the log2 µs buckets, in seconds: bucket N holds [2^N, 2^(N+1)) µs (bucket 0
# also below 1 µs), the last one everything above.
BUCKET_BOUNDS_S = (*(2.0 ** (n + 1) * 1e-6 for n in range(STATS_BUCKETS - 1)), float("inf"))
VCPU_NAME = re.compile(r"^CPU (\d+)/")  # QEMU's vCPU threads (-name debug-threads=on)

Describe = Callable[[np.ndarray], tuple[list[str | None], list[str | None]]]  # keys -> backing, kind


@dataclass
class FaultSeries:
    faults: int = 0
    stall_ns: int = 0
    buckets: np.ndarray = field(default_factory=lambda: np.zeros((len(HISTOGRAMS), STATS_BUCKETS), np.int64))


@dataclass
class IoctlSeries:
    calls: int = 0
    total_ns: int = 0
    buckets: np.ndarray = field(default_factory=lambda: np.zeros(STATS_BUCKETS, np.int64))


class Aggregates:
    """Labelled series of faults and ioctls, fed with cumulative readings of the kernel's
    aggregates. `lock` guards the series for readers on other threads (a scrape)."""

    def __init__(self, labels: Iterable[str], describe: Describe, comm_of: Callable[[int], str | None],
                 max_series: int = 2000, vcpus: dict[int, int] | None = None) -> None:
        self.labels = tuple(labels)
        unknown = set(self.labels) - set(FAULT_LABELS)
        if unknown:
            raise ValueError(f"unknown labels {sorted(unknown)}: choose from {', '.join(FAULT_LABELS)}")
        self.ioctl_labels = tuple(lb for lb in ("comm", "pid") if lb in self.labels)
        self._describe = describe
        self._comm_of = comm_of
        self.max_series = max_series
        self.faults: dict[tuple[str, ...], FaultSeries] = {}
        self.ioctls: dict[tuple[str, ...], IoctlSeries] = {}  # (*ioctl_labels, ioctl, errno)
        self.dropped = 0
        self.lock = threading.Lock()
        self._last: dict[bytes, np.void] = {}  # aggregate key -> its last reading
        self._labels_of: dict[bytes, tuple[str, ...]] = {}  # aggregate key -> its labels
        self._series_of: dict[bytes, tuple[str, ...]] = {}  # ... -> its series (maybe overflow)
        self._comms: dict[int, str] = {}
        self._vcpus = vcpus or {}  # tid -> QEMU vCPU index (--qmp), before thread names

    def update(self, fault_keys: np.ndarray, faults: np.ndarray,
               ioctl_keys: np.ndarray, ioctls: np.ndarray) -> None:
        """Add what each aggregate gained since the last reading to its series."""
        new = [i for i, k in enumerate(fault_keys) if k.tobytes() not in self._labels_of]
        if new:
            backing, kind = self._describe(fault_keys[new])
            for i, b, k in zip(new, backing, kind, strict=True):
                self._labels_of[fault_keys[i].tobytes()] = self._fault_labels(fault_keys[i], faults[i], b, k)
        for key, value in zip(ioctl_keys, ioctls, strict=True):
            raw = b"ioctl" + key.tobytes()
            if raw not in self._labels_of:
                self._labels_of[raw] = (
                    *self._process_labels(int(key["pid"]), value["comm"], self.ioctl_labels),
                    UFFDIO_NAMES.get(int(key["nr"]), f"nr{int(key['nr']):#x}").lower(),
                    _errno_name(int(key["err"])))
        with self.lock:
            for key, value in zip(fault_keys, faults, strict=True):
                raw = key.tobytes()
                gained = self._gained(raw, value, ("faults", "stall_ns", *HISTOGRAMS))
                if gained is None:
                    continue
                series = self._series(raw, self.faults, self.labels, FaultSeries)
                series.faults += int(gained["faults"])
                series.stall_ns += int(gained["stall_ns"])
                series.buckets += np.stack([gained[h] for h in HISTOGRAMS])
            for key, value in zip(ioctl_keys, ioctls, strict=True):
                raw = b"ioctl" + key.tobytes()
                gained = self._gained(raw, value, ("calls", "total_ns", "latency"))
                if gained is None:
                    continue
                series = self._series(raw, self.ioctls, (*self.ioctl_labels, "ioctl", "errno"), IoctlSeries)
                series.calls += int(gained["calls"])
                series.total_ns += int(gained["total_ns"])
                series.buckets += gained["latency"]

    def faults_by_path(self) -> dict[tuple[str, str], int]:
        """Faults so far by (backing, kind) ("unknown" where not known or not a label)."""
        at = {name: i for i, name in enumerate(self.labels)}
        counts: dict[tuple[str, str], int] = {}
        with self.lock:
            for labels, series in self.faults.items():
                path = tuple((labels[at[k]] if k in at else "") or "unknown" for k in ("backing", "kind"))
                counts[path] = counts.get(path, 0) + series.faults
        return counts

    def forget(self, pids: set[int]) -> None:
        """Processes that are gone: their aggregates go (their counts stay in the series)."""
        for raw in [r for r in self._labels_of if _pid_of(r) in pids]:
            self._last.pop(raw, None)
            self._labels_of.pop(raw)
            self._series_of.pop(raw, None)
        for pid in pids:
            self._comms.pop(pid, None)

    def _gained(self, raw: bytes, value: np.void, fields: tuple[str, ...]) -> dict | None:
        """What the aggregate `raw` counted since its last reading. Its first field is a u64
        count: smaller than before means a new aggregate under the same key. u32 counters are
        subtracted modulo 2^32 (they wrap). BPF adds a fault field by field, so a reading may
        catch one half-added: every field's difference counts, whichever grew."""
        last = self._last.get(raw)
        self._last[raw] = value.copy()
        if last is None or value[fields[0]] < last[fields[0]]:
            gained = {f: np.asarray(value[f]) for f in fields}
        else:
            gained = {f: np.asarray(value[f] - last[f]) for f in fields}  # same dtype: u32 wraps
        gained = {f: v.astype(np.int64) for f, v in gained.items()}
        return gained if any(v.any() for v in gained.values()) else None

    def _series(self, raw: bytes, table: dict, names: tuple[str, ...], make: type):
        """The series of aggregate `raw`: its labels' own, or, once max_series series exist,
        the overflow series (decided once per aggregate, and counted in `dropped`)."""
        labels = self._series_of.get(raw)
        if labels is None:
            labels = self._labels_of[raw]
            overflow = tuple(OVERFLOW if name in ("comm", "pid", "vcpu") else value
                             for name, value in zip(names, labels, strict=True))
            full = len(self.faults) + len(self.ioctls) >= self.max_series
            if labels not in table and full and overflow != labels:  # (backing x kind: few)
                self.dropped += 1
                labels = overflow
            self._series_of[raw] = labels
        return table.setdefault(labels, make())

    def _fault_labels(self, key: np.void, value: np.void, backing: str | None, kind: str | None
                      ) -> tuple[str, ...]:
        pid = int(key["pid"])
        kind = STATS_KINDS.get(int(key["kind"])) or kind
        tid = int(key["tid"])
        named = VCPU_NAME.match(value["comm"].decode(errors="replace")) if tid else None
        vcpu = self._vcpus.get(tid, named.group(1) if named else "") if tid else ""
        known = {"backing": backing or "", "kind": kind or "", "vcpu": str(vcpu)}
        process = dict(zip(("comm", "pid"), self._process_labels(pid, value["comm"], ("comm", "pid")),
                           strict=True))
        return tuple({**known, **process}[name] for name in self.labels)

    def comm_label(self, pid: int, fallback: bytes = b"?") -> str:
        """A process's comm label: its name when first seen (kept after it is gone)."""
        if pid not in self._comms:
            self._comms[pid] = self._comm_of(pid) or fallback.decode(errors="replace")
        return self._comms[pid]

    def _process_labels(self, pid: int, comm: bytes, names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(self.comm_label(pid, comm) if name == "comm" else str(pid) for name in names)


class StatsFeed:
    """Keeps `aggregates` (and per-process uffd event counts, `events`) up to date from a
    started stats-mode backend."""

    def __init__(self, backend: Backend, aggregates: Aggregates, comm: re.Pattern | None = None,
                 interval_s: float = 1.0, every_process: bool = False) -> None:
        self.backend = backend
        self.every_process = every_process  # --all: no process is confirmed one by one
        self.aggregates = aggregates
        self.comm = comm
        self.interval_s = interval_s
        self.events: dict[tuple[str, str], int] = {}  # (comm, event) -> count, as of the last tick
        self._events_gone: dict[tuple[str, str], int] = {}  # ... of processes forgotten since
        self._confirmed: set[int] = set()  # discovered processes that passed the --comm filter
        self._seen: set[int] = set()  # processes in the last reading
        self._next = 0.0

    def adopt_running(self) -> None:
        """Processes that already hold a userfaultfd are discovered like those that set one up
        later (one /proc scan)."""
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and int(entry.name) != os.getpid() and uffd_inodes(int(entry.name)):
                self.backend.track(int(entry.name), role=ROLE_DISCOVERED)

    def tick(self, now: bool = False) -> bool:
        """Once per interval (or `now`): confirm, read, forget. Returns False (a session's
        `until`: it never asks to stop)."""
        if not now and time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + self.interval_s
        tracked = self.backend.tracked()
        decided = {pid for pid, role in tracked.items() if role in (ROLE_TARGET, ROLE_HANDLER)}
        refused = set()
        for pid, role in sorted(tracked.items(), key=lambda item: item[1]):  # processes first
            if role == ROLE_DISCOVERED:
                name = self.backend.discovered_name(pid) or process_comm(pid)
                if self.comm is None or (name is not None and self.comm.search(name)):
                    self.backend.track(pid, role=ROLE_TARGET)
                    self._confirmed.add(pid)
                    decided.add(pid)
                    self.aggregates.comm_label(pid, (name or "?").encode())  # kept once it is gone
                else:
                    refused.add(pid)
            elif role == ROLE_PENDING_HANDLER:  # decided with the process that brought it in
                of = self.backend.handler_of(pid)
                if of in self._confirmed or tracked.get(of) in (ROLE_TARGET, ROLE_HANDLER):
                    self.backend.track(pid, role=ROLE_HANDLER)
                    decided.add(pid)
                elif of is None or of in refused or of not in tracked:
                    refused.add(pid)
        self.backend.forget(refused)  # before reading: their counts are not wanted
        # Gone before the reading: all their counts are in it (BPF counts a process's faults
        # and ioctls in its own threads), so they can go after it. One that dies after the
        # reading is forgotten at the next tick, once its last counts are read.
        gone = {pid for pid in decided | self._seen if not alive(pid)}
        fault_keys, faults = self.backend.stats("fault_stats")
        ioctl_keys, ioctls = self.backend.stats("ioctl_stats")
        if not self.every_process:  # those not decided yet are read once they are
            wanted = np.fromiter(decided, np.uint32, len(decided))
            kept = np.isin(fault_keys["pid"], wanted)
            fault_keys, faults = fault_keys[kept], faults[kept]
            kept = np.isin(ioctl_keys["pid"], wanted)
            ioctl_keys, ioctls = ioctl_keys[kept], ioctls[kept]
        self._seen = set(fault_keys["pid"].tolist()) | set(ioctl_keys["pid"].tolist())
        self.aggregates.update(fault_keys, faults, ioctl_keys, ioctls)
        events: dict[tuple[str, str], int] = {}
        for (pid, event), count in self.backend.uffd_event_counts().items():
            if self.every_process or pid in decided:
                key = (self.aggregates.comm_label(pid), UFFD_EVENTS.get(event, str(event)))
                kept_in = self._events_gone if pid in gone else events
                kept_in[key] = kept_in.get(key, 0) + count
        with self.aggregates.lock:
            self.events = {k: events.get(k, 0) + self._events_gone.get(k, 0)
                           for k in events.keys() | self._events_gone.keys()}
        self.backend.forget(gone)
        self.aggregates.forget(gone)
        self._confirmed -= gone
        return False


def _pid_of(raw: bytes) -> int:
    return int.from_bytes(raw.removeprefix(b"ioctl")[:4], "little")


def _errno_name(err: int) -> str:
    return errno.errorcode.get(err, str(err)) if err else "0"


def process_comm(pid: int) -> str | None:
    """The process's name (its main thread's), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None
