"""Raw BPF records -> one row per fault (uffdtrace.events.FAULT_COLUMNS), batch by batch.

A fault record is complete in the kernel except for what happens after T resumed: the exit
of the ioctl that woke it (its duration and `mapped`). Faults whose resolving ioctl has not
been seen yet wait here until it arrives or the stream ends, so no row is ever written twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from uffdtrace.events import FAULT_COLUMNS, coerce_faults, empty_faults
from uffdtrace.probes.paths import BASE_PAGE, Paths, huge_page_size
from uffdtrace.probes.records import (
    EV_FAULT,
    EV_IOCTL,
    F_EXITED,
    F_MSG,
    F_RESUMED,
    F_WOKEN,
    IO_HUGETLB,
    IO_MFILL,
    IO_PTE,
    IO_SHMEM,
    UFFD_PAGEFAULT_FLAG_MINOR,
    UFFD_PAGEFAULT_FLAG_WP,
    UFFDIO_NAMES,
)

RESOLVERS = {"CONTINUE", "COPY", "ZEROPAGE", "WAKE"}
RESOLVER_BY_NR = np.array([UFFDIO_NAMES.get(nr, "other") for nr in range(256)], dtype=object)
FAILED_IOCTL_MEMORY = 4096  # recent failed ioctls kept to attribute errnos to faults
EXIT_MEMORY_NS = 5_000_000_000  # how long resolving ioctls' exits wait for their faults


NR_CONTINUE = 0x07
# Columns the resolving ioctl's exit brings to its faults.
EXIT_COLUMNS = {"handler_tid": "Int64", "cont_enter_ns": "Int64", "cont_exit_ns": "Int64",
                "mapped": "Int64", "mfill_ns": "Int64", "install_ns": "Int64",
                "install_backing": "string"}


@dataclass
class Assembler:
    mode: str
    paths: Paths  # the backend's view of each fault's kernel path (uffdtrace.probes.paths)
    sees_ioctls: bool  # uffd ioctls are traced: resolver, errno and `mapped` can be known
    pending: pd.DataFrame = field(default_factory=empty_faults)
    ioctl_counts: dict[tuple[str, int], int] = field(default_factory=dict)  # (name, errno)
    _failed: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        {c: pd.Series(dtype="int64") for c in ("start", "end", "enter", "errno")}))
    _exits: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        {c: pd.Series(dtype=t) for c, t in EXIT_COLUMNS.items()}))
    register_ranges: list[dict] = field(default_factory=list)

    def feed(self, raw: np.ndarray) -> pd.DataFrame:
        """Take one drained batch; return the fault rows that are now complete."""
        self._take_ioctls(raw[raw["type"] == EV_IOCTL])
        faults = self._faults(raw[raw["type"] == EV_FAULT])
        return self._release(pd.concat([self.pending, faults], ignore_index=True), final=False)

    def finish(self) -> pd.DataFrame:
        """End of stream: release everything still waiting, with what is known."""
        return self._release(self.pending, final=True)

    def _take_ioctls(self, io: np.ndarray) -> None:
        errnos = np.where(io["ret"] < 0, -io["ret"], 0)
        pairs, counts = np.unique(np.stack([io["nr"].astype(np.int64), errnos]), axis=1,
                                  return_counts=True)
        for (nr, err), n in zip(pairs.T.tolist(), counts.tolist(), strict=True):
            key = (UFFDIO_NAMES.get(nr, f"nr{nr:#x}"), err)
            self.ioctl_counts[key] = self.ioctl_counts.get(key, 0) + n
        for rec in io[io["ret"] < 0]:
            self._failed.loc[len(self._failed)] = [
                int(rec["addr"]), int(rec["addr"] + rec["len"]), int(rec["t0"]), int(-rec["ret"])]
        if len(self._failed) > FAILED_IOCTL_MEMORY:
            self._failed = self._failed.iloc[-FAILED_IOCTL_MEMORY:].reset_index(drop=True)
        for rec in io[io["nr"] == 0x00]:  # UFFDIO_REGISTER
            self.register_ranges.append(
                {"pid": int(rec["pid"]), "start": int(rec["addr"]), "len": int(rec["len"]),
                 "mode": int(rec["x"]), "ok": int(rec["ret"]) == 0})
        resolving = io[np.isin(io["nr"], [0x02, 0x03, 0x04, NR_CONTINUE])]
        if len(resolving):
            flags = resolving["flags"]
            installed = (flags & (IO_HUGETLB | IO_SHMEM | IO_PTE)) != 0
            # hugetlb vs shmem from the PTE-install function the ioctl went through
            install_backing = np.select(
                [(flags & IO_HUGETLB) != 0,
                 ((flags & IO_SHMEM) != 0) | (((flags & IO_PTE) != 0) & (resolving["nr"] == NR_CONTINUE)),
                 (flags & IO_PTE) != 0],
                np.array(["hugetlb", "shmem", "anon"], dtype=object), None)
            self._exits = pd.concat([self._exits, pd.DataFrame({
                "handler_tid": resolving["tid"].astype(np.int64),
                "cont_enter_ns": resolving["t0"].astype(np.int64),
                "cont_exit_ns": resolving["t1"].astype(np.int64),
                "mapped": resolving["mapped"].astype(np.int64),
                "mfill_ns": pd.Series(resolving["t2"].astype(np.int64)).where((flags & IO_MFILL) != 0),
                "install_ns": pd.Series(resolving["t3"].astype(np.int64)).where(installed),
                "install_backing": install_backing,
            }).astype(EXIT_COLUMNS)], ignore_index=True)

    def _faults(self, f: np.ndarray) -> pd.DataFrame:
        if not len(f):
            return empty_faults()
        full = self.mode == "full"
        resumed = (f["flags"] & F_RESUMED) != 0

        def instant(values: np.ndarray, known: np.ndarray | None = None) -> pd.Series:
            s = pd.Series(values.astype(np.int64), dtype="Int64")
            mask = values != 0 if known is None else known
            return s.where(mask)

        fault = instant(f["t0"])
        block = instant(f["t1"])
        wake = instant(f["t2"])
        resume = instant(f["t3"], resumed)
        msg = instant(f["t4"], (f["flags"] & F_MSG) != 0)
        cont_enter = instant(f["t5"])
        returned = instant(f["t6"])
        df = pd.DataFrame({
            "fault_ns": fault,
            "pid": f["pid"].astype(np.int64),
            "tid": f["tid"].astype(np.int64),
            "comm": _decode(f["comm"]),
            "addr": f["addr"].astype(np.int64),
            "block_ns": block,
            "msg_ns": msg,
            "cont_enter_ns": cont_enter,
            "wake_ns": wake,
            "resume_ns": resume,
            "return_ns": returned,
            "handler_pid": instant(f["peer_pid"]),
            "handler_tid": instant(f["peer_tid"]),
            "outcome": np.select([(f["flags"] & F_EXITED) != 0, (f["flags"] & F_WOKEN) != 0],
                                 ["unresolved_exit", "resolved"], "no_wait"),
        })
        df["outcome"] = df["outcome"].astype("string")
        resolver = pd.Series(RESOLVER_BY_NR[f["nr"]], dtype="string")
        df["resolver"] = resolver.where(cont_enter.notna().to_numpy())
        df["errno"] = pd.Series(0 if self.sees_ioctls else pd.NA, index=df.index, dtype="Int64")
        self._classify(df, f, full)
        return df

    def _classify(self, df: pd.DataFrame, f: np.ndarray, full: bool) -> None:
        paths = self.paths(f)
        df["backing"] = paths["backing"].to_numpy()
        df["page_size"] = paths["page_size"].to_numpy()
        if full:
            flags = f["x"]
            msg_kind = np.where(flags & UFFD_PAGEFAULT_FLAG_MINOR, "minor",
                                np.where(flags & UFFD_PAGEFAULT_FLAG_WP, "wp", "missing"))
            has_msg = (f["flags"] & F_MSG) != 0
            kind = pd.Series(pd.array(np.where(has_msg, msg_kind, None), dtype="string"))
            df["kind"] = kind.fillna(paths["kind"])
        else:
            df["kind"] = paths["kind"].to_numpy()

    def _release(self, df: pd.DataFrame, final: bool) -> pd.DataFrame:
        if df.empty:
            self.pending = empty_faults()
            return empty_faults()
        keys = ["handler_tid", "cont_enter_ns"]
        df = df.drop(columns=[c for c in EXIT_COLUMNS if c not in keys], errors="ignore").merge(
            self._exits, on=keys, how="left")
        # A fault whose own path is unknown takes the backing its resolver installed into.
        unknown = df["backing"].isna() & df["install_backing"].notna()
        if unknown.any():
            df.loc[unknown, "backing"] = df.loc[unknown, "install_backing"]
            df.loc[unknown, "page_size"] = np.where(
                df.loc[unknown, "install_backing"] == "hugetlb", huge_page_size(), BASE_PAGE)
        has_exit = df["cont_exit_ns"].notna().to_numpy()
        waiting = df["cont_enter_ns"].notna().to_numpy() & ~has_exit
        if final or not self.sees_ioctls:
            waiting[:] = False
        self.pending = coerce_faults(df[waiting]).reset_index(drop=True)
        done = df[~waiting].copy()
        self._forget_old_exits()
        self._attach_errnos(done)
        return derive_durations(coerce_faults(done)).reset_index(drop=True)

    def _forget_old_exits(self) -> None:
        """An ioctl may resolve many faults (a WAKE over a range), so its exit is kept for a
        while rather than dropped at first use; faults reach us within seconds of it."""
        if len(self._exits):
            newest = self._exits["cont_exit_ns"].max()
            self._exits = self._exits[self._exits["cont_exit_ns"] >= newest - EXIT_MEMORY_NS]

    def _attach_errnos(self, df: pd.DataFrame) -> None:
        """errno of the last failed uffd ioctl on the fault's page while it was in flight."""
        if not self.sees_ioctls or self._failed.empty or df.empty:
            return
        addr = df["addr"].to_numpy(dtype=np.int64)
        lo = df["fault_ns"].to_numpy(dtype=np.int64, na_value=0)
        hi = df["resume_ns"].fillna(df["wake_ns"]).to_numpy(dtype=np.int64, na_value=np.iinfo(np.int64).max)
        errno = df["errno"].to_numpy(dtype=np.int64, na_value=0)
        for start, end, enter, err in self._failed.itertuples(index=False):
            hit = (addr >= start) & (addr < end) & (lo <= enter) & (enter <= hi)
            errno[hit] = err
        df["errno"] = pd.array(errno, dtype="Int64")


def _decode(names: np.ndarray) -> pd.Series:
    """C strings -> pandas strings, decoding each distinct name once."""
    distinct, index = np.unique(names, return_inverse=True)
    decoded = np.array([n.decode(errors="replace") for n in distinct], dtype=object)
    return pd.Series(decoded[index], dtype="string")


def derive_durations(df: pd.DataFrame) -> pd.DataFrame:
    """The *_ns durations of DESIGN §1 from the instants (missing where an end is missing)."""
    df["stall_ns"] = df["return_ns"].fillna(df["resume_ns"]) - df["fault_ns"]
    notify = df["msg_ns"] - df["block_ns"]
    df["notify_ns"] = notify.where(notify >= 0)  # the handler had it before T slept: unknown
    df["handler_ns"] = df["cont_enter_ns"] - df["msg_ns"]
    df["continue_ns"] = df["cont_exit_ns"] - df["cont_enter_ns"]
    df["wake_to_run_ns"] = df["resume_ns"] - df["wake_ns"]
    return df[list(FAULT_COLUMNS)]


__all__ = ["RESOLVERS", "Assembler", "derive_durations"]
