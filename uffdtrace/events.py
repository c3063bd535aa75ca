"""The two record types of uffdtrace: a userfaultfd fault, from touch to resume, and a uffd
ioctl of a traced process; and what a live session reports about itself.

Records travel in batches as pandas DataFrames with exactly these columns (the CSVs of
`uffdtrace record`, `-o` and `--ioctls`, have the same columns in this order). Times are
CLOCK_MONOTONIC nanoseconds, the clock of bpf_ktime_get_ns. Unknown values are missing (<NA>,
an empty CSV cell), never invented: integer columns use pandas' nullable Int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

BACKINGS = ("hugetlb", "shmem", "anon")  # a fault's memory, from its kernel path
KINDS = ("minor", "missing", "wp")
OUTCOMES = ("resolved", "no_wait", "released", "interrupted", "unresolved_exit", "unresolved_end")

# name -> (pandas dtype, meaning). Order is the CSV column order.
FAULT_COLUMNS: dict[str, tuple[str, str]] = {
    "fault_ns": ("Int64", "instant the thread entered the page fault (absolute CLOCK_MONOTONIC)"),
    "pid": ("Int64", "process (tgid) of the faulting thread"),
    "tid": ("Int64", "faulting thread"),
    "comm": ("string", "faulting thread's name"),
    "vcpu": ("Int64", "QEMU vCPU index of the faulting thread, from its name (`CPU n/KVM`, "
             "`CPU n/TCG`: QEMU's -name debug-threads=on) or from QMP (--qmp); empty for "
             "threads that are not vCPUs"),
    "addr": ("Int64", "faulting address"),
    "page_size": ("Int64", "page size of the faulting mapping in bytes"),
    "backing": ("string", f"{' | '.join(BACKINGS)}, from the kernel path"),
    "kind": ("string", " | ".join(KINDS)),
    "stall_ns": ("Int64", "end - fault: how long the thread could not run (end: return_ns, "
                 "else resume_ns)"),
    "notify_ns": ("Int64", "msg - block: until the handler had the message"),
    "handler_ns": ("Int64", "cont_enter - msg: handler work before its resolving ioctl"),
    "continue_ns": ("Int64", "cont_exit - cont_enter: the resolving ioctl itself"),
    "wake_to_run_ns": ("Int64", "resume - wake: scheduler delay after the wakeup"),
    "resolver": ("string", "ioctl that woke the thread: CONTINUE | COPY | ZEROPAGE | WAKE | other"),
    "handler_pid": ("Int64", "process of the thread that resolved the fault"),
    "handler_tid": ("Int64", "thread that resolved the fault"),
    "errno": ("Int64", "errno of the resolving ioctl (0: it succeeded; empty: no resolving "
              "ioctl known). Failed ioctls of other faults or repeats are in the ioctl records"),
    "mapped": ("Int64", "bytes the resolving ioctl reported as mapped"),
    "mfill_ns": ("Int64", "time inside the resolving ioctl's mcopy/mfill function, the work "
                 "without argument handling and wakeup (kprobe backend)"),
    "install_ns": ("Int64", "time inside its PTE-install functions, summed over its pages "
                   "(kprobe backend)"),
    "block_ns": ("Int64", "instant the thread went to sleep in handle_userfault"),
    "msg_ns": ("Int64", "instant the handler received the fault message"),
    "cont_enter_ns": ("Int64", "instant the resolving ioctl was entered"),
    "cont_exit_ns": ("Int64", "instant the resolving ioctl returned"),
    "wake_ns": ("Int64", "instant the thread was woken"),
    "resume_ns": ("Int64", "instant the thread was on a CPU again"),
    "return_ns": ("Int64", "instant the thread returned to user space, the fault done "
                  "(needs rseq, which glibc registers)"),
    "outcome": ("string", "resolved | no_wait (full mode: resolved before the thread had to "
                "sleep; no resume) | released (full mode: woken by its userfaultfd's release, the "
                "handler having closed it or exited, not by an ioctl) | interrupted (full mode: "
                "woken by a signal; the thread faults again) | unresolved_exit (the thread exited "
                "inside the fault: killed, or its process ended) | unresolved_end (still asleep "
                "in the fault when tracing ended)"),
}

# name -> (pandas dtype, meaning): one row per uffd ioctl of a traced process (full mode).
IOCTL_COLUMNS: dict[str, tuple[str, str]] = {
    "enter_ns": ("Int64", "instant the ioctl was entered"),
    "pid": ("Int64", "process of the calling thread"),
    "tid": ("Int64", "calling thread"),
    "comm": ("string", "calling thread's name"),
    "ioctl": ("string", "API | REGISTER | UNREGISTER | COPY | ZEROPAGE | CONTINUE | WAKE | "
              "WRITEPROTECT | POISON | MOVE | nrN"),
    "start": ("Int64", "range start (COPY, MOVE: dst; API: empty)"),
    "len": ("Int64", "range length in bytes (API: empty)"),
    "mode": ("Int64", "mode word (REGISTER: MISSING 1 | WP 2 | MINOR 4; CONTINUE: DONTWAKE 1; "
             "COPY: DONTWAKE 1 | WP 2; API: the requested features)"),
    "ret": ("Int64", "return value"),
    "errno": ("Int64", "-ret when it failed, else 0"),
    "mapped": ("Int64", "bytes the ioctl reports as done (CONTINUE, ZEROPAGE: mapped; COPY: "
               "copy; MOVE: move; POISON: updated); empty for the others"),
    "duration_ns": ("Int64", "exit - enter"),
    "woken": ("Int64", "faults of traced threads it woke"),
    "mfill_ns": ("Int64", "time inside its mcopy/mfill function (kprobe backend)"),
    "install_ns": ("Int64", "time inside its PTE-install functions (kprobe backend)"),
    "exit_ns": ("Int64", "instant the ioctl returned"),
}

# `report` over several recordings gives every row this column too: its recording. It is no
# column of the files, and a plugin gets it along with the columns it reads.
SOURCE = "source"
SOURCE_COLUMN: dict[str, tuple[str, str]] = {
    SOURCE: ("string", "the recording the row comes from: its file name without the suffix, or "
             "its path where two recordings share a name (`report` over several recordings)"),
}

# Columns whose values come from a fixed set (or are empty: unknown). The ioctl records have
# none: their ioctl names include nrN, for any ioctl number without a name.
CATEGORIES: dict[str, tuple[str, ...]] = {"backing": BACKINGS, "kind": KINDS, "outcome": OUTCOMES}


@dataclass(frozen=True)
class BlockedFault:
    """A fault whose thread is asleep in it right now, waiting for its handler (live only)."""

    pid: int
    tid: int
    addr: int
    fault_ns: int


@dataclass(frozen=True)
class Status:
    """A live session at one instant, for status lines (the TUI's, a plugin host's)."""

    backend: str
    mode: str
    faults: int
    lost: int
    bpf_run_ns: int  # the tracer's BPF programs' run time since they were loaded
    bpf_runs: int
    cpu_s: float  # the tracer process's CPU time
    at_s: float  # time.monotonic() of the snapshot
    blocked: tuple[BlockedFault, ...]  # faults blocked now, oldest first (as of the last scan)


def empty_frame(dtypes: dict[str, str]) -> pd.DataFrame:
    """An empty DataFrame with these columns and dtypes."""
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in dtypes.items()})


def empty_faults(columns: dict[str, tuple[str, str]] = FAULT_COLUMNS) -> pd.DataFrame:
    """An empty batch with the right columns and dtypes."""
    return empty_frame({name: dtype for name, (dtype, _) in columns.items()})


def coerce_faults(df: pd.DataFrame,
                  columns: dict[str, tuple[str, str]] = FAULT_COLUMNS) -> pd.DataFrame:
    """Give a batch the canonical column order and dtypes (missing columns become <NA>)."""
    out = pd.DataFrame(index=df.index)
    for name, (dtype, _) in columns.items():
        out[name] = df[name].astype(dtype) if name in df else pd.Series(pd.NA, index=df.index, dtype=dtype)
    return out


def empty_ioctls() -> pd.DataFrame:
    return empty_faults(IOCTL_COLUMNS)
