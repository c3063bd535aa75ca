"""Blocked time per thread and process, and QEMU postcopy-blocktime's all-threads-blocked time.

Tables:
  threads    pid, tid, comm, faults, blocked_ns (sum of stall_ns)
  processes  pid, threads, faults, blocked_ns, all_blocked_ns

all_blocked_ns is the time during which every thread of the process seen faulting in the run
was stalled at once: the measure of [fault_ns, resume_ns) over which the number of stalled
threads equals the number of threads seen (faults without resume_ns count, but add no interval).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from uffdtrace.plugins import Plugin, RunContext

COLUMNS = ("pid", "tid", "comm", "fault_ns", "resume_ns", "stall_ns")


def merge_intervals(pid: np.ndarray, tid: np.ndarray, start: np.ndarray, end: np.ndarray,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The union of [start, end) per thread, as disjoint intervals (pid, start, end) sorted by
    pid."""
    if not pid.size:
        return pid, start, end
    order = np.lexsort((start, tid, pid))
    pid, tid, start, end = pid[order], tid[order], start[order], end[order]
    same = np.zeros(pid.size, dtype=bool)
    same[1:] = (pid[1:] == pid[:-1]) & (tid[1:] == tid[:-1])
    thread = np.cumsum(~same)
    reach = pd.Series(end).groupby(thread).cummax().to_numpy()  # furthest end so far
    new = ~same
    new[1:] |= start[1:] > reach[:-1]
    first = np.flatnonzero(new)
    return pid[first], start[first], np.maximum.reduceat(end, first)


def all_blocked_ns(start: np.ndarray, end: np.ndarray, threads: int) -> int:
    """Time covered by `threads` of the (per-thread disjoint) intervals at once."""
    if threads == 0 or start.size < threads:
        return 0
    times = np.concatenate([start, end])
    delta = np.concatenate([np.ones(start.size, np.int64), -np.ones(end.size, np.int64)])
    order = np.lexsort((delta, times))  # at equal times ends go first: intervals are half-open
    times, depth = times[order], np.cumsum(delta[order])
    return int(np.diff(times)[depth[:-1] == threads].sum())


class BlocktimePlugin(Plugin):
    name = "blocktime"
    description = "blocked time per thread and process, and time with all threads blocked"
    columns = COLUMNS

    def start(self, ctx: RunContext) -> None:
        self._parts: list[pd.DataFrame] = []

    def batch(self, df: pd.DataFrame) -> None:
        self._parts.append(df)

    def finish(self) -> dict[str, pd.DataFrame]:
        df = pd.concat(self._parts) if self._parts else pd.DataFrame(columns=COLUMNS)
        df = df[df["pid"].notna() & df["tid"].notna()]
        threads = (df.groupby(["pid", "tid"])
                   .agg(comm=("comm", "last"), faults=("tid", "size"),
                        blocked_ns=("stall_ns", "sum"))
                   .reset_index())
        procs = (threads.groupby("pid")
                 .agg(threads=("tid", "size"), faults=("faults", "sum"),
                      blocked_ns=("blocked_ns", "sum"))
                 .reset_index())
        timed = df[df["fault_ns"].notna() & df["resume_ns"].notna()]
        pid, start, end = merge_intervals(*(timed[c].to_numpy(np.int64) for c in
                                            ("pid", "tid", "fault_ns", "resume_ns")))
        lo = np.searchsorted(pid, procs["pid"].to_numpy(np.int64), side="left")
        hi = np.searchsorted(pid, procs["pid"].to_numpy(np.int64), side="right")
        procs["all_blocked_ns"] = [
            all_blocked_ns(start[a:b], end[a:b], n)
            for a, b, n in zip(lo, hi, procs["threads"], strict=True)
        ]
        return {"threads": threads, "processes": procs}
