"""Blocked time per thread and process, and QEMU postcopy-blocktime's all-threads-blocked time.

Tables:
  threads    pid, tid, comm, faults, blocked_ns (sum of stall_ns)
  processes  pid, threads, faults, blocked_ns, all_blocked_ns

all_blocked_ns is the time during which every thread of the process seen faulting in the run
was stalled at once: the measure of [fault_ns, fault_ns + stall_ns) over which the number of
stalled threads equals the number of threads seen (faults without a stall count, but add no
interval).

Panel (live viewers): threads by total stall, with fault count and approximate p50/p99 stall.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from uffdtrace.aggregate import LogHistogram, all_blocked_ns, merge_intervals
from uffdtrace.plugins import Panel, Plugin, RunContext, Table

COLUMNS = ("pid", "tid", "comm", "fault_ns", "stall_ns")


class BlocktimePlugin(Plugin):
    name = "blocktime"
    description = "blocked time per thread and process, and time with all threads blocked"
    columns = COLUMNS

    def start(self, ctx: RunContext) -> None:
        self._parts: list[pd.DataFrame] = []
        self.keep = ctx.tables
        self.reset()

    def reset(self) -> None:
        self._rows: dict[tuple[int, int], int] = {}  # (pid, tid) -> row of the arrays below
        self._comm: list[str] = []
        self._faults = np.zeros(0, dtype=np.int64)
        self._blocked = np.zeros(0, dtype=np.int64)
        self._stall = LogHistogram(0)

    def batch(self, df: pd.DataFrame) -> None:
        if self.keep:
            self._parts.append(df)
        df = df[df["pid"].notna() & df["tid"].notna()]
        if df.empty:
            return
        keys = df["pid"].to_numpy(np.int64) << 32 | df["tid"].to_numpy(np.int64)
        threads, codes = np.unique(keys, return_inverse=True)
        comms = df["comm"].fillna("").to_numpy()
        last = np.zeros(len(threads), dtype=np.int64)
        last[codes] = np.arange(len(codes))  # the thread's name in its last row wins
        rows = np.array([self._row((int(k >> 32), int(k & 0xFFFFFFFF)), comms[i])
                         for k, i in zip(threads, last, strict=True)])
        grow = len(self._rows) - len(self._faults)
        self._faults = np.concatenate([self._faults, np.zeros(grow, dtype=np.int64)])
        self._blocked = np.concatenate([self._blocked, np.zeros(grow, dtype=np.int64)])
        self._stall.grow(len(self._rows))
        row = rows[codes]
        stall = df["stall_ns"].to_numpy(dtype=np.int64, na_value=-1)
        np.add.at(self._faults, row, 1)
        np.add.at(self._blocked, row, stall.clip(0))
        self._stall.add(stall[stall >= 0], row[stall >= 0])

    def _row(self, key: tuple[int, int], comm: str) -> int:
        row = self._rows.setdefault(key, len(self._rows))
        if row == len(self._comm):
            self._comm.append(comm)
        else:
            self._comm[row] = comm
        return row

    def panels(self) -> list[Panel]:
        p50, p99 = self._stall.percentile(50), self._stall.percentile(99)
        rows = tuple((pid, tid, self._comm[r], int(self._faults[r]), int(p50[r]), int(p99[r]),
                      int(self._blocked[r])) for (pid, tid), r in self._rows.items())
        return [Panel("threads", (Table("threads by stall", ("pid", "tid", "comm", "faults",
                                                             "p50_ns", "p99_ns", "blocked_ns"),
                                        rows, sort=6),))]

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
        timed = df[df["fault_ns"].notna() & df["stall_ns"].notna()]
        pid, tid, start, stall = (timed[c].to_numpy(np.int64)
                                  for c in ("pid", "tid", "fault_ns", "stall_ns"))
        pid, start, end = merge_intervals(pid, tid, start, start + stall)
        lo = np.searchsorted(pid, procs["pid"].to_numpy(np.int64), side="left")
        hi = np.searchsorted(pid, procs["pid"].to_numpy(np.int64), side="right")
        procs["all_blocked_ns"] = [
            all_blocked_ns(start[a:b], end[a:b], n)
            for a, b, n in zip(lo, hi, procs["threads"], strict=True)
        ]
        return {"threads": threads, "processes": procs}
