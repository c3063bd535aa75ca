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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from uffdtrace.events import (
    FAULT_COLUMNS,
    IOCTL_COLUMNS,
    coerce_faults,
    empty_faults,
    empty_frame,
    empty_ioctls,
)
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
IOCTL_BY_NR = np.array([UFFDIO_NAMES.get(nr, f"nr{nr:#x}") for nr in range(256)], dtype=object)
MEMORY_NS = 5_000_000_000  # how long ioctl exits wait for their faults
NO_WAIT_PATIENCE_NS = 1_000_000_000  # how long a no_wait fault waits for the ioctl that mapped it
SCAN_CHUNK = 4096
VCPU_NAME = r"^CPU (\d+)/(?:KVM|TCG|HVF|WHPX|NVMM)$"  # QEMU's vCPU thread names (accelerators)

# Columns the resolving ioctl's exit brings to its faults (`errno` is the ioctl's).
EXIT_COLUMNS = {"handler_tid": "Int64", "cont_enter_ns": "Int64", "cont_exit_ns": "Int64",
                "mapped": "Int64", "mfill_ns": "Int64", "install_ns": "Int64",
                "install_backing": "string", "errno": "Int64"}
# What else is kept of each resolving ioctl, to find the one that mapped a no_wait fault's page.
EXIT_RANGE_COLUMNS = {"handler_pid": "int64", "nr": "int64", "mm": "uint64", "start": "uint64",
                      "end": "uint64", "ok": "bool"}


@dataclass(frozen=True)
class Batch:
    """What one feed() releases: fault rows now complete, and the ioctl rows of the batch."""

    faults: pd.DataFrame
    ioctls: pd.DataFrame


def _no_pending() -> pd.DataFrame:
    """Fault rows waiting: FAULT_COLUMNS and the address space (a kernel pointer: exact as
    uint64 only, so typed even when empty)."""
    return empty_faults().assign(mm=pd.Series(dtype="uint64"))


@dataclass
class Assembler:
    paths: PathClassifier  # the backend's view of each fault's kernel path (uffdtrace.probes.paths)
    sees_ioctls: bool  # uffd ioctls are traced: resolver, errno and `mapped` can be known
    pending: pd.DataFrame = field(default_factory=_no_pending)
    ioctl_counts: dict[tuple[str, int], int] = field(default_factory=dict)  # (name, errno)
    register_ranges: list[dict] = field(default_factory=list)
    vcpus: dict[int, int] = field(default_factory=dict)  # tid -> QEMU vCPU index (from QMP)
    _exits: pd.DataFrame = field(default_factory=lambda: empty_frame({**EXIT_COLUMNS, **EXIT_RANGE_COLUMNS}))
    _now: int = 0  # the newest instant seen in any record

    def feed(self, raw: np.ndarray) -> Batch:
        """Take one drained batch; return the rows that are now complete."""
        io = raw["ioctl"][raw["type"] == EV_IOCTL]
        f = raw["fault"][raw["type"] == EV_FAULT]
        self._now = max(self._now, int(f["fault_ns"].max(initial=0)), int(io["exit_ns"].max(initial=0)))
        ioctls = self._take_ioctls(io)
        faults = self._faults(f)
        return Batch(self._release(pd.concat([self.pending, faults], ignore_index=True), final=False),
                     ioctls)

    def finish(self) -> Batch:
        """End of stream: release everything still waiting, with what is known."""
        return Batch(self._release(self.pending, final=True), empty_ioctls())

    # -- ioctls -------------------------------------------------------------------------

    def _take_ioctls(self, io: np.ndarray) -> pd.DataFrame:
        if not len(io):
            return empty_ioctls()
        nr = io["nr"].astype(np.int64)
        ret = io["ret"].astype(np.int64)
        errnos = np.where(ret < 0, -ret, 0)
        pairs, counts = np.unique(np.stack([nr, errnos]), axis=1, return_counts=True)
        for (n, err), k in zip(pairs.T.tolist(), counts.tolist(), strict=True):
            key = (IOCTL_BY_NR[n], err)
            self.ioctl_counts[key] = self.ioctl_counts.get(key, 0) + k
        for rec in io[nr == NR_REGISTER]:
            self.register_ranges.append(
                {"pid": int(rec["pid"]), "start": int(rec["start"]), "len": int(rec["len"]),
                 "mode": int(rec["mode"]), "ok": int(rec["ret"]) == 0})

        flags = io["flags"]
        api = nr == NR_API
        installed = (flags & (IO_HUGETLB | IO_SHMEM | IO_PTE)) != 0
        rows = pd.DataFrame({
            "enter_ns": io["enter_ns"].astype(np.int64),
            "pid": io["pid"].astype(np.int64),
            "tid": io["tid"].astype(np.int64),
            "comm": _decode(io["comm"]),
            "ioctl": pd.Series(IOCTL_BY_NR[nr], dtype="string"),
            "start": pd.Series(io["start"].astype(np.int64), dtype="Int64").where(~api),
            "len": pd.Series(io["len"].astype(np.int64), dtype="Int64").where(~api),
            "mode": np.where(api, io["len"], io["mode"]).astype(np.int64),
            "ret": ret,
            "errno": errnos,
            "mapped": pd.Series(io["mapped"], dtype="Int64").where(np.isin(nr, REPORTS_MAPPED)),
            "duration_ns": (io["exit_ns"] - io["enter_ns"]).astype(np.int64),
            "woken": io["woken"].astype(np.int64),
            "mfill_ns": pd.Series(io["mfill_ns"].astype(np.int64), dtype="Int64")
            .where((flags & IO_MFILL) != 0),
            "install_ns": pd.Series(io["install_ns"].astype(np.int64), dtype="Int64").where(installed),
            "exit_ns": io["exit_ns"].astype(np.int64),
        })
        rows = coerce_faults(rows, IOCTL_COLUMNS)

        resolving = np.isin(nr, RESOLVING_NRS)
        if resolving.any():
            r, rnr, rflags = rows[resolving], nr[resolving], flags[resolving]
            # hugetlb vs shmem from the PTE-install function the ioctl went through
            install_backing = np.select(
                [(rflags & IO_HUGETLB) != 0,
                 ((rflags & IO_SHMEM) != 0) | (((rflags & IO_PTE) != 0) & (rnr == NR_CONTINUE)),
                 (rflags & IO_PTE) != 0],
                np.array(["hugetlb", "shmem", "anon"], dtype=object), None)
            exits = pd.DataFrame({
                "handler_tid": r["tid"], "cont_enter_ns": r["enter_ns"], "cont_exit_ns": r["exit_ns"],
                "mapped": r["mapped"], "mfill_ns": r["mfill_ns"], "install_ns": r["install_ns"],
                "install_backing": install_backing, "errno": r["errno"],
                "handler_pid": r["pid"], "nr": rnr, "mm": io["mm"][resolving],
                "start": io["start"][resolving], "end": io["start"][resolving] + io["len"][resolving],
                # it mapped something (a WAKE maps nothing, but wakes what another ioctl mapped)
                "ok": (r["ret"].to_numpy(dtype=np.int64) >= 0) & (rnr != NR_WAKE)
                | (r["mapped"].fillna(0).to_numpy(dtype=np.int64) > 0),
            }).astype({**EXIT_COLUMNS, **EXIT_RANGE_COLUMNS})
            self._exits = pd.concat([self._exits, exits], ignore_index=True)
        return rows

    # -- faults -------------------------------------------------------------------------

    def _faults(self, f: np.ndarray) -> pd.DataFrame:
        if not len(f):
            return _no_pending()
        resumed = (f["flags"] & F_RESUMED) != 0

        def instant(values: np.ndarray, known: np.ndarray | None = None) -> pd.Series:
            s = pd.Series(values.astype(np.int64), dtype="Int64")
            mask = values != 0 if known is None else known
            return s.where(mask)

        flags = f["flags"]
        # Not resolved, whoever woke the thread: it exited in the fault, was still asleep in it,
        # or was woken by its userfaultfd's release or by a signal.
        unresolved = (flags & (F_EXITED | F_BLOCKED_AT_END | F_RELEASED | F_SIGNALLED)) != 0
        waker_ioctl = instant(f["waker_ioctl_ns"]).where(~unresolved)
        df = pd.DataFrame({
            "fault_ns": instant(f["fault_ns"]),
            "pid": f["pid"].astype(np.int64),
            "tid": f["tid"].astype(np.int64),
            "comm": (comm := _decode(f["comm"])),
            "vcpu": vcpu_of(f["tid"], comm, self.vcpus),
            "addr": f["addr"].astype(np.int64),
            "block_ns": instant(f["block_ns"]),
            "msg_ns": instant(f["msg_ns"], (flags & F_MSG) != 0),
            "cont_enter_ns": waker_ioctl,
            "wake_ns": instant(f["wake_ns"]),
            "resume_ns": instant(f["resume_ns"], resumed),
            "return_ns": instant(f["return_ns"]),
            "handler_pid": instant(f["waker_pid"]).where(~unresolved),
            "handler_tid": instant(f["waker_tid"]).where(~unresolved),
            "outcome": np.select(
                [(flags & f) != 0 for f in (F_BLOCKED_AT_END, F_EXITED, F_RELEASED, F_SIGNALLED, F_WOKEN)],
                ["unresolved_end", "unresolved_exit", "released", "interrupted", "resolved"], "no_wait"),
            "mm": f["mm"],
        })
        df["outcome"] = df["outcome"].astype("string")
        resolver = pd.Series(IOCTL_BY_NR[f["waker_nr"]], dtype="string")
        df["resolver"] = resolver.where(waker_ioctl.notna().to_numpy())
        self._classify(df, f)
        return df

    def _classify(self, df: pd.DataFrame, f: np.ndarray) -> None:
        paths = self.paths(f)
        df["backing"] = paths["backing"].to_numpy()
        df["page_size"] = paths["page_size"].to_numpy()
        has_msg = (f["flags"] & F_MSG) != 0  # the message's flags tell the kind, where read
        by_msg = np.where(has_msg, _kind_of_message(f["msg_flags"]), None)
        kind = pd.Series(pd.array(by_msg, dtype="string"))
        df["kind"] = kind.fillna(paths["kind"])

    def _release(self, df: pd.DataFrame, final: bool) -> pd.DataFrame:
        if df.empty:
            self.pending = _no_pending()
            return empty_faults()
        keys = ["handler_tid", "cont_enter_ns"]
        joined = [c for c in EXIT_COLUMNS if c not in keys]
        df = df.drop(columns=joined, errors="ignore").merge(
            self._exits[[*keys, *joined]], on=keys, how="left")
        if self.sees_ioctls:
            self._find_resolvers(df)
        # A fault whose own path is unknown takes the backing its resolver installed into.
        unknown = df["backing"].isna() & df["install_backing"].notna()
        if unknown.any():
            df.loc[unknown, "backing"] = df.loc[unknown, "install_backing"]
            df.loc[unknown, "page_size"] = np.where(
                df.loc[unknown, "install_backing"] == "hugetlb", huge_page_size(), BASE_PAGE)
        waiting = np.zeros(len(df), dtype=bool)
        if self.sees_ioctls and not final:
            no_exit = df["cont_enter_ns"].notna().to_numpy() & df["cont_exit_ns"].isna().to_numpy()
            unmapped = ((df["outcome"] == "no_wait").to_numpy() & df["cont_enter_ns"].isna().to_numpy()
                        & (df["fault_ns"].to_numpy(dtype=np.int64, na_value=0)
                           > self._now - NO_WAIT_PATIENCE_NS))
            waiting = no_exit | unmapped
        self.pending = df[waiting].reset_index(drop=True)
        done = df[~waiting]
        self._forget_old()
        return derive_durations(coerce_faults(done)).reset_index(drop=True)

    def _find_resolvers(self, df: pd.DataFrame) -> None:
        """no_wait faults: the first ioctl of the same address space that mapped the page and
        returned after the fault began (the one whose mapping the thread found)."""
        rows = np.flatnonzero((df["outcome"] == "no_wait").to_numpy() & df["cont_enter_ns"].isna().to_numpy()
                              & df["fault_ns"].notna().to_numpy())
        ex = self._exits[self._exits["ok"]]
        if not len(rows) or ex.empty:
            return
        ex = ex.sort_values("cont_exit_ns")
        exit_ns = ex["cont_exit_ns"].to_numpy(dtype=np.int64)
        mm, start, end = (ex[c].to_numpy() for c in ("mm", "start", "end"))
        for i in rows:
            fault_mm, addr = np.uint64(df.at[i, "mm"]), np.uint64(df.at[i, "addr"])
            lo = int(np.searchsorted(exit_ns, int(df.at[i, "fault_ns"])))
            for chunk in range(lo, len(ex), SCAN_CHUNK):
                s = slice(chunk, chunk + SCAN_CHUNK)
                hit = np.flatnonzero((mm[s] == fault_mm) & (start[s] <= addr) & (addr < end[s]))
                if len(hit):
                    found = ex.iloc[chunk + hit[0]]
                    for c in (*EXIT_COLUMNS, "handler_pid"):
                        df.at[i, c] = found[c]
                    df.at[i, "resolver"] = IOCTL_BY_NR[int(found["nr"])]
                    break

    def _forget_old(self) -> None:
        """An ioctl may resolve many faults (a WAKE over a range), so its exit is kept for a
        while rather than dropped at first use; faults reach us within seconds of it."""
        if len(self._exits):
            self._exits = self._exits[self._exits["cont_exit_ns"] >= self._now - MEMORY_NS]


def _kind_of_message(flags: np.ndarray) -> np.ndarray:
    flags = flags.astype(np.uint64)
    return np.where(flags & UFFD_PAGEFAULT_FLAG_MINOR, "minor",
                    np.where(flags & UFFD_PAGEFAULT_FLAG_WP, "wp", "missing"))


def vcpu_of(tid: np.ndarray, comm: pd.Series, known: dict[int, int]) -> pd.Series:
    """QEMU vCPU index per fault: from `known` (tid -> index, as QMP's query-cpus-fast says),
    else from the thread's name (`CPU 1/KVM`, `CPU 0/TCG`: QEMU's -name debug-threads=on)."""
    named = pd.to_numeric(comm.str.extract(VCPU_NAME, expand=False), errors="coerce")
    vcpu = pd.Series(named, dtype="Int64")
    if known:
        listed = pd.Series(tid.astype(np.int64)).map(known)
        vcpu = pd.Series(listed, dtype="Int64").fillna(vcpu)
    return vcpu


def _decode(names: np.ndarray) -> pd.Series:
    """C strings -> pandas strings, decoding each distinct name once."""
    distinct, index = np.unique(names, return_inverse=True)
    decoded = np.array([n.decode(errors="replace") for n in distinct], dtype=object)
    return pd.Series(decoded[index], dtype="string")


def derive_durations(df: pd.DataFrame) -> pd.DataFrame:
    """The *_ns durations (docs/design.md, 'Durations') from the instants (missing where an end
    is missing)."""
    df["stall_ns"] = df["return_ns"].fillna(df["resume_ns"]) - df["fault_ns"]
    notify = df["msg_ns"] - df["block_ns"]
    df["notify_ns"] = notify.where(notify >= 0)  # the handler had it before T slept: unknown
    df["handler_ns"] = df["cont_enter_ns"] - df["msg_ns"]
    df["continue_ns"] = df["cont_exit_ns"] - df["cont_enter_ns"]
    df["wake_to_run_ns"] = df["resume_ns"] - df["wake_ns"]
    return df[list(FAULT_COLUMNS)]


__all__ = ["RESOLVERS", "Assembler", "Batch", "derive_durations"]
