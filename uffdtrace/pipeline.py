"""Raw BPF records -> rows: one per fault (FAULT_COLUMNS) and one per uffd ioctl
(IOCTL_COLUMNS), batch by batch.

A fault record is complete in the kernel except for what comes later or from elsewhere:
- the exit of the ioctl that woke it (duration, return value, `mapped`), joined by the
  waker's thread and the ioctl's entry instant;
- its resolver, when it never had to sleep (`no_wait`: the page was mapped before the thread
  slept, so no wakeup names the ioctl): the first ioctl of its address space that mapped its
  page after the fault began.
Faults wait here until what they need has arrived (or the stream ends), so no row is ever
written twice.

At 100k faults/s pandas' per-operation costs would exceed the kernel side's, so rows are
assembled as plain numpy columns (`Columns`) and become DataFrames only on the way out: every
value is an int64, a missing one is `NA`, and a string is a code into the assembler's `Words`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from uffdtrace.aggregate import distinct_rows
from uffdtrace.events import FAULT_COLUMNS, IOCTL_COLUMNS, empty_faults, empty_ioctls
from uffdtrace.probes.paths import BASE_PAGE, PathClassifier, huge_page_size
from uffdtrace.probes.records import (
    EV_FAULT,
    EV_IOCTL,
    F_BLOCKED_AT_END,
    F_EXITED,
    F_MSG,
    F_RELEASED,
    F_RESUMED,
    F_SIGNALLED,
    F_WOKEN,
    IO_HUGETLB,
    IO_MFILL,
    IO_PTE,
    IO_SHMEM,
    NR_API,
    NR_CONTINUE,
    NR_COPY,
    NR_MOVE,
    NR_POISON,
    NR_REGISTER,
    NR_WAKE,
    NR_ZEROPAGE,
    UFFD_PAGEFAULT_FLAG_MINOR,
    UFFD_PAGEFAULT_FLAG_WP,
    UFFDIO_NAMES,
)

RESOLVERS = {"CONTINUE", "COPY", "ZEROPAGE", "WAKE"}
REPORTS_MAPPED = [NR_CONTINUE, NR_ZEROPAGE, NR_COPY, NR_MOVE, NR_POISON]  # a result field
RESOLVING_NRS = [NR_WAKE, NR_COPY, NR_ZEROPAGE, NR_CONTINUE]
IOCTL_BY_NR = [UFFDIO_NAMES.get(nr, f"nr{nr:#x}") for nr in range(256)]
MEMORY_NS = 5_000_000_000  # how long ioctl exits wait for their faults
NO_WAIT_PATIENCE_NS = 1_000_000_000  # how long a no_wait fault waits for the ioctl that mapped it
SCAN_CHUNK = 4096
VCPU_NAME = re.compile(r"^CPU (\d+)/(?:KVM|TCG|HVF|WHPX|NVMM)$")  # QEMU's vCPU thread names
OUTCOME_FLAGS = ((F_BLOCKED_AT_END, "unresolved_end"), (F_EXITED, "unresolved_exit"),
                 (F_RELEASED, "released"), (F_SIGNALLED, "interrupted"), (F_WOKEN, "resolved"))

NA = np.iinfo(np.int64).min  # a missing value in Columns (<NA> in the DataFrames)
INT64_MAX = np.iinfo(np.int64).max
Columns = dict[str, np.ndarray]  # name -> int64 values (strings as Words codes); `mm` is uint64

# Columns the resolving ioctl's exit brings to its faults (`errno` is the ioctl's).
EXIT_COLUMNS = ("handler_tid", "cont_enter_ns", "cont_exit_ns", "mapped", "mfill_ns",
                "install_ns", "install_backing", "errno")
JOINED = EXIT_COLUMNS[2:]  # what a fault takes from the exit whose thread and entry it names
DURATIONS = ("stall_ns", "notify_ns", "handler_ns", "continue_ns", "wake_to_run_ns")


@dataclass(frozen=True)
class Batch:
    """What one feed() releases: fault rows now complete, and the ioctl rows of the batch."""

    faults: pd.DataFrame
    ioctls: pd.DataFrame


class Words:
    """Strings as int64 codes (NA: missing), so that string columns are numpy columns too."""

    def __init__(self) -> None:
        self._code: dict[str, int] = {}
        self._words: list[str] = []
        self._arrow = pa.array([], pa.large_string())

    def __getitem__(self, code: int) -> str:
        return self._words[code]

    def codes(self, words: list[str]) -> np.ndarray:
        """The code of each word (few words: a table to index)."""
        for w in words:
            if w not in self._code:
                self._code[w] = len(self._words)
                self._words.append(w)
        return np.array([self._code[w] for w in words], dtype=np.int64)

    def of(self, values: pd.Series) -> np.ndarray:
        """Codes of a pandas column (<NA>: NA), hashing each value once."""
        index, distinct = pd.factorize(values)
        table = np.append(self.codes(list(distinct)), NA)
        return table[index]  # index -1 (missing) picks NA

    def strings(self, codes: np.ndarray) -> pd.arrays.ArrowStringArray:
        if len(self._arrow) < len(self._words):
            self._arrow = pa.array(self._words, pa.large_string())
        missing = codes == NA
        index = pa.array(np.where(missing, 0, codes).astype(np.int32), mask=missing)
        return pd.arrays.ArrowStringArray(
            pa.DictionaryArray.from_arrays(index, self._arrow).cast(pa.large_string()))


class Exits:
    """Resolving ioctls' exits, kept a while: an ioctl may resolve many faults (a WAKE over a
    range), and faults reach us within seconds of it. They are kept in chunks as they came (one
    per batch, by entry instant), so that a batch costs a search per chunk, not a copy of all.
    An exit before its chunk's cut is forgotten; a chunk goes once all of it is."""

    MAX_CHUNKS = 32  # then they become one

    def __init__(self) -> None:
        self._chunks: list[Columns] = []
        self._cuts: list[int] = []

    def add(self, new: Columns) -> None:
        self._chunks.append(_take(new, np.argsort(new["cont_enter_ns"], kind="stable")))
        self._cuts.append(NA)  # none forgotten yet, whenever it exited

    def join(self, tid: np.ndarray, enter: np.ndarray) -> tuple[np.ndarray, Columns]:
        """As pandas' left merge on (handler_tid, cont_enter_ns): the row each output row is
        of (in row order, a row's exits in the order they came) and the JOINED columns (NA
        where a row has no exit)."""
        rows, chunk_of, hits = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        known = np.flatnonzero(enter != NA)
        for k, (chunk, cut) in enumerate(zip(self._chunks, self._cuts, strict=True)):
            ex_enter = chunk["cont_enter_ns"]
            if not len(ex_enter):
                continue
            near = known[(enter[known] >= ex_enter[0]) & (enter[known] <= ex_enter[-1])]
            lo = np.searchsorted(ex_enter, enter[near], "left")
            n = np.searchsorted(ex_enter, enter[near], "right") - lo
            row = np.repeat(near, n)
            candidates = np.arange(len(row)) - np.repeat(np.cumsum(n) - n - lo, n)
            same = (chunk["handler_tid"][candidates] == tid[row]) & (chunk["cont_exit_ns"][candidates] >= cut)
            rows.append(row[same])
            chunk_of.append(np.full(np.count_nonzero(same), k))
            hits.append(candidates[same])
        alone = np.ones(len(enter), dtype=bool)
        for row in rows:
            alone[row] = False
        rows.append(np.flatnonzero(alone))
        chunk_of.append(np.full(len(rows[-1]), -1))
        hits.append(np.zeros(len(rows[-1]), np.int64))
        order = np.argsort(np.concatenate(rows), kind="stable")
        row, chunk_of, hit = (np.concatenate(a)[order] for a in (rows, chunk_of, hits))
        joined = {c: np.full(len(row), NA) for c in JOINED}
        for k in np.unique(chunk_of[chunk_of >= 0]).tolist():
            at = chunk_of == k
            for c in JOINED:
                joined[c][at] = self._chunks[k][c][hit[at]]
        return row, joined

    def mapping(self) -> Columns:
        """The exits remembered that mapped something, by exit instant."""
        parts = [_take(chunk, chunk["ok"] & (chunk["cont_exit_ns"] >= cut))
                 for chunk, cut in zip(self._chunks, self._cuts, strict=True)]
        if not parts:
            return {}
        ok = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
        return _take(ok, np.argsort(ok["cont_exit_ns"], kind="stable"))

    def forget(self, cut: int) -> None:
        """Forget the exits before `cut` (later ones may still be wanted)."""
        keep = [k for k, chunk in enumerate(self._chunks) if chunk["cont_exit_ns"].max(initial=NA) >= cut]
        self._chunks = [self._chunks[k] for k in keep]
        self._cuts = [cut] * len(keep)
        if len(self._chunks) > self.MAX_CHUNKS:
            merged = {c: np.concatenate([ch[c] for ch in self._chunks]) for c in self._chunks[0]}
            self._chunks, self._cuts = [], []
            self.add(_take(merged, merged["cont_exit_ns"] >= cut))


def _no_pending() -> Columns:
    """Fault rows waiting: the fault columns known before the durations, the address space and
    the backing the resolver installed into."""
    cols = {name: np.empty(0, np.int64) for name in FAULT_COLUMNS if name not in DURATIONS}
    return cols | {"mm": np.empty(0, np.uint64), "install_backing": np.empty(0, np.int64)}


def _take(cols: Columns, rows: np.ndarray) -> Columns:
    return {name: values[rows] for name, values in cols.items()}


def _minus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where((a != NA) & (b != NA), a - b, NA)


def _known(values: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """An instant or id as int64, NA where 0 (not set) or where not `known`."""
    values = values.astype(np.int64)
    return np.where(values != 0 if known is None else known, values, NA)


@dataclass
class Assembler:
    paths: PathClassifier  # the backend's view of each fault's kernel path (uffdtrace.probes.paths)
    sees_ioctls: bool  # uffd ioctls are traced: resolver, errno and `mapped` can be known
    ioctl_counts: dict[tuple[str, int], int] = field(default_factory=dict)  # (name, errno)
    register_ranges: list[dict] = field(default_factory=list)
    vcpus: dict[int, int] = field(default_factory=dict)  # tid -> QEMU vCPU index (from QMP)
    words: Words = field(default_factory=Words)
    pending: Columns = field(default_factory=_no_pending)
    exits: Exits = field(default_factory=Exits)
    _vcpu_of_name: dict[int, int] = field(default_factory=dict)  # comm code -> vCPU (as named)
    _now: int = 0  # the newest instant seen in any record

    def __post_init__(self) -> None:
        w = self.words
        self._ioctl_names = w.codes(IOCTL_BY_NR)  # by ioctl number
        self._outcomes = w.codes([name for _, name in OUTCOME_FLAGS] + ["no_wait"])
        self._no_wait = self._outcomes[-1]
        self._backings = w.codes(["hugetlb", "shmem", "anon"])
        self._msg_kinds = w.codes(["minor", "wp", "missing"])

    def feed(self, raw: np.ndarray) -> Batch:
        """Take one drained batch; return the rows that are now complete."""
        io = raw["ioctl"][raw["type"] == EV_IOCTL]
        f = raw["fault"][raw["type"] == EV_FAULT]
        self._now = max(self._now, int(f["fault_ns"].max(initial=0)), int(io["exit_ns"].max(initial=0)))
        ioctls = self._take_ioctls(io)
        faults = self._faults(f)
        rows = {name: np.concatenate([self.pending[name], faults[name]]) for name in self.pending}
        return Batch(self._release(rows, final=False), ioctls)

    def finish(self) -> Batch:
        """End of stream: release everything still waiting, with what is known."""
        return Batch(self._release(self.pending, final=True), empty_ioctls())

    def _frame(self, cols: Columns, columns: dict[str, tuple[str, str]]) -> pd.DataFrame:
        """Rows as the DataFrame of `columns` (nullable Int64 and string columns)."""
        return pd.DataFrame({
            name: pd.arrays.IntegerArray(cols[name], cols[name] == NA) if dtype == "Int64"
            else self.words.strings(cols[name]) for name, (dtype, _) in columns.items()}, copy=False)

    def _comm(self, names: np.ndarray) -> np.ndarray:
        """C strings -> codes, decoding each distinct name once (told apart by hashing their
        8-byte words: sorting the strings costs more)."""
        index, first = distinct_rows(*np.ascontiguousarray(names).view(np.uint64).reshape(len(names), -1).T)
        return self.words.codes([n.decode(errors="replace") for n in names[first].tolist()])[index]

    # -- ioctls -------------------------------------------------------------------------

    def _take_ioctls(self, io: np.ndarray) -> pd.DataFrame:
        if not len(io):
            return empty_ioctls()
        nr = io["nr"].astype(np.int64)
        ret = io["ret"].astype(np.int64)
        errnos = np.where(ret < 0, -ret, 0)
        failed = errnos != 0  # few: (number, errno) pairs there, numbers alone (faster) elsewhere
        numbers, counts = np.unique(nr[~failed], return_counts=True)
        pairs, pair_counts = np.unique(np.stack([nr[failed], errnos[failed]]), axis=1, return_counts=True)
        keys = [(n, 0) for n in numbers.tolist()] + [tuple(p) for p in pairs.T.tolist()]
        for (n, err), k in zip(keys, counts.tolist() + pair_counts.tolist(), strict=True):
            key = (IOCTL_BY_NR[n], err)
            self.ioctl_counts[key] = self.ioctl_counts.get(key, 0) + k
        for rec in io[nr == NR_REGISTER]:
            self.register_ranges.append(
                {"pid": int(rec["pid"]), "start": int(rec["start"]), "len": int(rec["len"]),
                 "mode": int(rec["mode"]), "ok": int(rec["ret"]) == 0})

        flags = io["flags"]
        api = nr == NR_API
        installed = (flags & (IO_HUGETLB | IO_SHMEM | IO_PTE)) != 0
        enter, exit_ = io["enter_ns"].astype(np.int64), io["exit_ns"].astype(np.int64)
        rows = {
            "enter_ns": enter,
            "pid": io["pid"].astype(np.int64),
            "tid": io["tid"].astype(np.int64),
            "comm": self._comm(io["comm"]),
            "ioctl": self._ioctl_names[nr],
            "start": np.where(api, NA, io["start"].astype(np.int64)),
            "len": np.where(api, NA, io["len"].astype(np.int64)),
            "mode": np.where(api, io["len"], io["mode"]).astype(np.int64),
            "ret": ret,
            "errno": errnos,
            "mapped": np.where(np.isin(nr, REPORTS_MAPPED), io["mapped"], NA),
            "duration_ns": (io["exit_ns"] - io["enter_ns"]).astype(np.int64),
            "woken": io["woken"].astype(np.int64),
            "mfill_ns": np.where((flags & IO_MFILL) != 0, io["mfill_ns"].astype(np.int64), NA),
            "install_ns": np.where(installed, io["install_ns"].astype(np.int64), NA),
            "exit_ns": exit_,
        }
        resolving = np.isin(nr, RESOLVING_NRS)
        if resolving.any():
            r, rnr, rflags = _take(rows, resolving), nr[resolving], flags[resolving]
            # hugetlb vs shmem from the PTE-install function the ioctl went through
            install_backing = np.select(
                [(rflags & IO_HUGETLB) != 0,
                 ((rflags & IO_SHMEM) != 0) | (((rflags & IO_PTE) != 0) & (rnr == NR_CONTINUE)),
                 (rflags & IO_PTE) != 0],
                self._backings, NA)
            start = io["start"][resolving]
            self.exits.add({
                "handler_tid": r["tid"], "cont_enter_ns": r["enter_ns"], "cont_exit_ns": r["exit_ns"],
                "mapped": r["mapped"], "mfill_ns": r["mfill_ns"], "install_ns": r["install_ns"],
                "install_backing": install_backing, "errno": r["errno"],
                # and what finds the one that mapped a no_wait fault's page
                "handler_pid": r["pid"], "nr": rnr, "mm": io["mm"][resolving],
                "start": start, "end": start + io["len"][resolving],
                # it mapped something (a WAKE maps nothing, but wakes what another ioctl mapped)
                "ok": (r["ret"] >= 0) & (rnr != NR_WAKE) | (r["mapped"] > 0),  # NA < 0
            })
        return self._frame(rows, IOCTL_COLUMNS)

    # -- faults -------------------------------------------------------------------------

    def _faults(self, f: np.ndarray) -> Columns:
        if not len(f):
            return _no_pending()
        flags = f["flags"]
        # Not resolved, whoever woke the thread: it exited in the fault, was still asleep in it,
        # or was woken by its userfaultfd's release or by a signal.
        resolved = (flags & (F_EXITED | F_BLOCKED_AT_END | F_RELEASED | F_SIGNALLED)) == 0
        waker_ioctl = np.where(resolved, _known(f["waker_ioctl_ns"]), NA)
        paths = self.paths(f)
        has_msg = (flags & F_MSG) != 0  # the message's flags tell the kind, where read
        comm = self._comm(f["comm"])
        return {
            "fault_ns": _known(f["fault_ns"]),
            "pid": f["pid"].astype(np.int64),
            "tid": f["tid"].astype(np.int64),
            "comm": comm,
            "vcpu": self._vcpu(f["tid"], comm),
            "addr": f["addr"].astype(np.int64),
            "page_size": paths["page_size"].to_numpy(dtype=np.int64, na_value=NA),
            "backing": self.words.of(paths["backing"]),
            "kind": np.where(has_msg, self._kind_of_message(f["msg_flags"]), self.words.of(paths["kind"])),
            "resolver": np.where(waker_ioctl != NA, self._ioctl_names[f["waker_nr"]], NA),
            "handler_pid": np.where(resolved, _known(f["waker_pid"]), NA),
            "handler_tid": np.where(resolved, _known(f["waker_tid"]), NA),
            "errno": np.full(len(f), NA),
            "mapped": np.full(len(f), NA),
            "mfill_ns": np.full(len(f), NA),
            "install_ns": np.full(len(f), NA),
            "block_ns": _known(f["block_ns"]),
            "msg_ns": _known(f["msg_ns"], has_msg),
            "cont_enter_ns": waker_ioctl,
            "cont_exit_ns": np.full(len(f), NA),
            "wake_ns": _known(f["wake_ns"]),
            "resume_ns": _known(f["resume_ns"], (flags & F_RESUMED) != 0),
            "return_ns": _known(f["return_ns"]),
            "outcome": np.select([(flags & flag) != 0 for flag, _ in OUTCOME_FLAGS],
                                 self._outcomes[:-1], self._no_wait),
            "mm": f["mm"],
            "install_backing": np.full(len(f), NA),
        }

    def _kind_of_message(self, flags: np.ndarray) -> np.ndarray:
        flags = flags.astype(np.uint64)
        minor, wp, missing = self._msg_kinds
        return np.where(flags & UFFD_PAGEFAULT_FLAG_MINOR, minor,
                        np.where(flags & UFFD_PAGEFAULT_FLAG_WP, wp, missing))

    def _vcpu(self, tid: np.ndarray, comm: np.ndarray) -> np.ndarray:
        """QEMU vCPU index per fault: from `vcpus` (tid -> index, as QMP's query-cpus-fast
        says), else from the thread's name (`CPU 1/KVM`, `CPU 0/TCG`: QEMU's -name
        debug-threads=on), parsed once per distinct name."""
        distinct, index = np.unique(comm, return_inverse=True)
        for code in distinct.tolist():
            if code not in self._vcpu_of_name:
                m = VCPU_NAME.search(self.words[code])
                self._vcpu_of_name[code] = int(m.group(1)) if m else NA
        vcpu = np.array([self._vcpu_of_name[c] for c in distinct.tolist()], np.int64)[index.reshape(-1)]
        if self.vcpus:
            listed = np.array(list(self.vcpus), np.int64)
            order = np.argsort(listed)
            at = order[np.searchsorted(listed, tid, sorter=order).clip(max=len(listed) - 1)]
            vcpu = np.where(listed[at] == tid, np.array(list(self.vcpus.values()), np.int64)[at], vcpu)
        return vcpu

    def _release(self, rows: Columns, final: bool) -> pd.DataFrame:
        if not len(rows["fault_ns"]):
            self.pending = _no_pending()
            return empty_faults()
        row, joined = self.exits.join(rows["handler_tid"], rows["cont_enter_ns"])
        rows = _take(rows, row) | joined
        if self.sees_ioctls:
            self._find_resolvers(rows)
        # A fault whose own path is unknown takes the backing its resolver installed into.
        unknown = (rows["backing"] == NA) & (rows["install_backing"] != NA)
        if unknown.any():
            rows["backing"] = np.where(unknown, rows["install_backing"], rows["backing"])
            page = np.where(rows["install_backing"] == self._backings[0], huge_page_size(), BASE_PAGE)
            rows["page_size"] = np.where(unknown, page, rows["page_size"])
        waiting = np.zeros(len(row), dtype=bool)
        if self.sees_ioctls and not final:
            no_exit = (rows["cont_enter_ns"] != NA) & (rows["cont_exit_ns"] == NA)
            unmapped = ((rows["outcome"] == self._no_wait) & (rows["cont_enter_ns"] == NA)
                        & (np.where(rows["fault_ns"] == NA, 0, rows["fault_ns"])
                           > self._now - NO_WAIT_PATIENCE_NS))
            waiting = no_exit | unmapped
        self.pending = _take(rows, waiting)
        done = _take(rows, ~waiting)
        self.exits.forget(min(self._now - MEMORY_NS, INT64_MAX))  # _now: a u64
        return self._frame(done | _durations(done), FAULT_COLUMNS)

    def _find_resolvers(self, rows: Columns) -> None:
        """no_wait faults: the first ioctl of the same address space that mapped the page and
        returned after the fault began (the one whose mapping the thread found)."""
        todo = np.flatnonzero((rows["outcome"] == self._no_wait) & (rows["cont_enter_ns"] == NA)
                              & (rows["fault_ns"] != NA))
        if not len(todo):
            return
        ex = self.exits.mapping()
        if not ex or not len(ex["ok"]):
            return
        exit_ns, mm, start, end = (ex[c] for c in ("cont_exit_ns", "mm", "start", "end"))
        found, by = [], []
        for i in todo.tolist():  # few: faults whose page was mapped before the thread slept
            fault_mm, addr = rows["mm"][i], np.uint64(rows["addr"][i])
            for chunk in range(int(np.searchsorted(exit_ns, rows["fault_ns"][i])), len(exit_ns), SCAN_CHUNK):
                s = slice(chunk, chunk + SCAN_CHUNK)
                hit = np.flatnonzero((mm[s] == fault_mm) & (start[s] <= addr) & (addr < end[s]))
                if len(hit):
                    found.append(i)
                    by.append(chunk + hit[0])
                    break
        for c in (*EXIT_COLUMNS, "handler_pid"):
            rows[c][found] = ex[c][by]
        rows["resolver"][found] = self._ioctl_names[ex["nr"][by]]


def _durations(rows: Columns) -> Columns:
    """The *_ns durations (docs/design.md, 'Durations') from the instants (missing where an end
    is missing)."""
    end = np.where(rows["return_ns"] != NA, rows["return_ns"], rows["resume_ns"])
    notify = _minus(rows["msg_ns"], rows["block_ns"])
    return {
        "stall_ns": _minus(end, rows["fault_ns"]),
        "notify_ns": np.where(notify >= 0, notify, NA),  # the handler had it before T slept: unknown
        "handler_ns": _minus(rows["cont_enter_ns"], rows["msg_ns"]),
        "continue_ns": _minus(rows["cont_exit_ns"], rows["cont_enter_ns"]),
        "wake_to_run_ns": _minus(rows["resume_ns"], rows["wake_ns"]),
    }


__all__ = ["RESOLVERS", "Assembler", "Batch"]
