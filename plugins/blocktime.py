"""Blocked time per thread and process, and QEMU postcopy-blocktime's all-threads-blocked time.

Tables:
  threads    pid, tid, comm, faults, blocked_ns (sum of stall_ns)
  processes  pid, threads, faults, blocked_ns, all_blocked_ns

all_blocked_ns is the time during which every thread of the process seen faulting in the run
was stalled at once: the measure of [fault_ns, fault_ns + stall_ns) over which the number of
stalled threads equals the number of threads seen (faults without a stall count, but add no
interval). Over several recordings (`report A B`) both tables start with their `source`, and a
thread is a (source, pid, tid): two hosts' pid 42 stay apart.

Sums are kept per thread as the batches come; only the blocked intervals are kept, two
integers per fault, for all_blocked_ns.

Panel (live viewers): threads by total stall, with fault count and approximate p50/p99 stall.
A live viewer keeps no intervals: its memory is per thread seen (an 8 KiB histogram each).
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from uffdtrace.aggregate import LogHistogram, all_blocked_ns
from uffdtrace.events import SOURCE
from uffdtrace.plugins import Panel, Plugin, RunContext, Table

COLUMNS = ("pid", "tid", "comm", "fault_ns", "stall_ns")
Thread = tuple[str | None, int, int]  # source (None: one recording), pid, tid


class BlocktimePlugin(Plugin):
    name = "blocktime"
    description = "blocked time per thread and process, and time with all threads blocked"
    columns = COLUMNS

    def start(self, ctx: RunContext) -> None:
        self.keep = ctx.tables
        self._sourced = False
        # the tables': one row per thread, never reset
        self._threads: dict[Thread, int] = {}
        self._names: list[str | None] = []  # the last name each thread had
        self._counts = np.zeros(0, dtype=np.int64)
        self._sums = np.zeros(0, dtype=np.int64)
        self._blocked: list[list[tuple[np.ndarray, np.ndarray]]] = []  # per thread: (start, end)
        self.reset()

    def reset(self) -> None:
        self._rows: dict[Thread, int] = {}  # the panel's: thread -> row of the arrays below
        self._comm: list[str] = []
        self._faults = np.zeros(0, dtype=np.int64)
        self._blocked_ns = np.zeros(0, dtype=np.int64)
        self._stall = LogHistogram(0)

    def batch(self, df: pd.DataFrame) -> None:
        self._sourced |= SOURCE in df
        known = (df["pid"].notna() & df["tid"].notna()).to_numpy(bool)
        if not known.all():
            df = df[known]
        if df.empty:
            return
        threads, codes = _threads(df)
        comms = df["comm"].to_numpy(dtype=object, na_value=None)
        stall = df["stall_ns"].to_numpy(dtype=np.int64, na_value=-1)
        self._live(threads, codes, comms, stall)
        if self.keep:
            self._tabulate(threads, codes, comms, stall, df["fault_ns"].to_numpy(np.int64,
                                                                                 na_value=-1))

    def _live(self, threads: list[Thread], codes: np.ndarray, comms: np.ndarray,
              stall: np.ndarray) -> None:
        last = np.zeros(len(threads), dtype=np.int64)
        last[codes] = np.arange(len(codes))  # the thread's name in its last row wins
        rows = np.array([self._row(t, comms[i] or "") for t, i in zip(threads, last, strict=True)])
        grow = len(self._rows) - len(self._faults)
        self._faults = np.concatenate([self._faults, np.zeros(grow, dtype=np.int64)])
        self._blocked_ns = np.concatenate([self._blocked_ns, np.zeros(grow, dtype=np.int64)])
        self._stall.grow(len(self._rows))
        row = rows[codes]
        self._faults += np.bincount(row, minlength=len(self._faults))
        self._blocked_ns += np.bincount(row, weights=stall.clip(0), minlength=len(self._faults)
                                        ).astype(np.int64)  # exact: a batch's sums are < 2^53 ns
        self._stall.add(stall[stall >= 0], row[stall >= 0])

    def _row(self, key: Thread, comm: str) -> int:
        row = self._rows.setdefault(key, len(self._rows))
        if row == len(self._comm):
            self._comm.append(comm)
        else:
            self._comm[row] = comm
        return row

    def _tabulate(self, threads: list[Thread], codes: np.ndarray, comms: np.ndarray,
                  stall: np.ndarray, start: np.ndarray) -> None:
        """Sums per thread (a thread's name: its last one known), and the blocked intervals."""
        rows = np.array([self._threads.setdefault(t, len(self._threads)) for t in threads])
        grow = len(self._threads) - len(self._counts)
        if grow:
            self._counts = np.concatenate([self._counts, np.zeros(grow, dtype=np.int64)])
            self._sums = np.concatenate([self._sums, np.zeros(grow, dtype=np.int64)])
            self._names += [None] * grow
            self._blocked += [[] for _ in range(grow)]
        named = np.flatnonzero(pd.notna(comms))
        last = np.full(len(threads), -1)
        last[codes[named]] = named
        for thread, i in zip(rows, last, strict=True):
            if i >= 0:
                self._names[thread] = comms[i]
        known = stall >= 0
        self._counts += np.bincount(rows[codes], minlength=len(self._counts))
        np.add.at(self._sums, rows[codes][known], stall[known])
        timed = known & (start >= 0)
        order = np.argsort(codes[timed], kind="stable")  # by thread, in the batch's order
        by_thread = codes[timed][order]
        begin, end = start[timed][order], (start + stall)[timed][order]
        cuts = np.searchsorted(by_thread, np.arange(len(threads) + 1))
        for code, (a, b) in enumerate(itertools.pairwise(cuts)):
            if b > a:
                self._blocked[rows[code]].append((begin[a:b], end[a:b]))

    def panels(self) -> list[Panel]:
        p50, p99 = self._stall.percentile(50), self._stall.percentile(99)
        rows = tuple((pid, tid, self._comm[r], int(self._faults[r]), int(p50[r]), int(p99[r]),
                      int(self._blocked_ns[r])) for (_, pid, tid), r in self._rows.items())
        return [Panel("threads", (Table("threads by stall", ("pid", "tid", "comm", "faults",
                                                             "p50_ns", "p99_ns", "blocked_ns"),
                                        rows, sort=6),))]

    def finish(self) -> dict[str, pd.DataFrame]:
        order = sorted(self._threads.items(), key=lambda kv: (kv[0][0] or "", *kv[0][1:]))
        rows = np.array([r for _, r in order], dtype=np.int64)
        source = [t[0] for t, _ in order]
        threads = pd.DataFrame({
            "pid": pd.array([t[1] for t, _ in order], dtype="Int64"),
            "tid": pd.array([t[2] for t, _ in order], dtype="Int64"),
            "comm": pd.array([self._names[r] for r in rows], dtype="string"),
            "faults": self._counts[rows], "blocked_ns": pd.array(self._sums[rows], dtype="Int64")})
        process = ["pid"]
        if self._sourced:
            threads.insert(0, SOURCE, pd.array(source, dtype="string"))
            process = [SOURCE, "pid"]
        procs = (threads.groupby(process)
                 .agg(threads=("tid", "size"), faults=("faults", "sum"),
                      blocked_ns=("blocked_ns", "sum"))
                 .reset_index())
        members: dict[tuple, list[int]] = {}
        for (src, pid, _), r in order:
            members.setdefault((src, pid) if self._sourced else (pid,), []).append(r)
        procs["all_blocked_ns"] = pd.Series(
            [self._all_blocked(members[key]) for key in procs[process].itertuples(index=False)],
            dtype=np.int64, index=procs.index)
        return {"threads": threads, "processes": procs}

    def _all_blocked(self, threads: list[int]) -> int:
        """How long all these threads were blocked at once."""
        starts, ends = [], []
        for thread in threads:
            parts = self._blocked[thread]
            if not parts:
                return 0  # a thread that never stalled: never all at once
            begin, end = _union(np.concatenate([b for b, _ in parts]),
                                np.concatenate([e for _, e in parts]))
            starts.append(begin)
            ends.append(end)
        return all_blocked_ns(np.concatenate(starts), np.concatenate(ends), len(threads))


def _threads(df: pd.DataFrame) -> tuple[list[Thread], np.ndarray]:
    """The batch's threads, and each row's index among them."""
    key = df["pid"].to_numpy(np.int64) << 32 | df["tid"].to_numpy(np.int64)
    sources: list[str | None] = [None]
    if SOURCE in df:
        source, sources = pd.factorize(df[SOURCE])
        key = np.stack([source, key])  # sources: few, in the order they come
    keys, codes = np.unique(key, axis=-1, return_inverse=True)
    keys = keys.reshape(-1, keys.shape[-1])
    threads = [(sources[int(k[0])] if len(k) == 2 else None, int(k[-1] >> 32),
                int(k[-1] & 0xFFFFFFFF)) for k in keys.T]
    return threads, codes.reshape(-1)


def _union(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One thread's [start, end) intervals as disjoint ones, in order."""
    order = np.argsort(start, kind="stable")  # the rows are nearly in order already
    start, end = start[order], end[order]
    reach = np.maximum.accumulate(end)  # furthest end so far
    new = np.concatenate([[True], start[1:] > reach[:-1]])
    first = np.flatnonzero(new)
    return start[first], np.maximum.reduceat(end, first)
