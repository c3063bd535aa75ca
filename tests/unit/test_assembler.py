"""The assembler on synthetic BPF records: no kernel, no root.

Each case builds the raw records a race or a foreign handler produces and checks the rows:
what joins a fault to its resolving ioctl and its errno.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from uffdtrace.events import OUTCOMES
from uffdtrace.pipeline import Assembler, Batch
from uffdtrace.probes.paths import paths_frame
from uffdtrace.probes.records import (
    EV_FAULT,
    EV_IOCTL,
    F_BLOCKED,
    F_BLOCKED_AT_END,
    F_EXITED,
    F_MSG,
    F_RELEASED,
    F_RESUMED,
    F_SIGNALLED,
    F_SLEPT,
    F_WOKEN,
    FAULT_DTYPE,
    IOCTL_DTYPE,
    RECORD_DTYPE,
)

MM = 0xFFFF888123456789  # a kernel pointer: exact only as uint64
OTHER_MM = 0xFFFF888100000040
PAGE = 0x7F0000010000
NR_CONTINUE, NR_COPY = 0x07, 0x03
MINOR = 4
MS = 1_000_000


def shmem_minor(f: np.ndarray) -> pd.DataFrame:
    n = len(f)
    return paths_frame(np.array(["shmem"] * n, dtype=object), np.array(["minor"] * n, dtype=object))


def records(*rows: dict) -> np.ndarray:
    """Ring-buffer records, each built from its type's named fields."""
    out = np.zeros(len(rows), RECORD_DTYPE)
    for i, row in enumerate(rows):
        one = np.zeros((), FAULT_DTYPE if row["type"] == EV_FAULT else IOCTL_DTYPE)
        for k, v in row.items():
            one[k] = v
        out[i]["fault" if row["type"] == EV_FAULT else "ioctl"] = one
    return out


def fault(t0: int, tid: int = 11, addr: int = PAGE + 5, flags: int = 0, **kw) -> dict:
    return {"type": EV_FAULT, "pid": 10, "tid": tid, "fault_ns": t0, "addr": addr, "flags": flags,
            "mm": MM, "comm": b"vcpu", **kw}


def ioctl(t0: int, t1: int, tid: int = 21, nr: int = NR_CONTINUE, start: int = PAGE,
          ret: int = 0, mm: int = MM, woken: int = 0) -> dict:
    return {"type": EV_IOCTL, "pid": 20, "tid": tid, "nr": nr, "enter_ns": t0, "exit_ns": t1,
            "start": start, "len": 4096, "ret": ret, "mapped": 4096 if ret == 0 else ret, "mm": mm,
            "woken": woken, "comm": b"handler"}


def run(*batches: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    asm = Assembler(shmem_minor, sees_ioctls=True)
    out = [asm.feed(b) for b in batches] + [asm.finish()]
    faults = pd.concat([b.faults for b in out], ignore_index=True)
    ioctls = pd.concat([b.ioctls for b in out], ignore_index=True)
    return faults, ioctls


def woken(t0: int, enter: int, **kw) -> dict:
    """A fault that slept and was woken by the CONTINUE entered at `enter` (thread 21)."""
    return fault(t0, **{"flags": F_BLOCKED | F_SLEPT | F_WOKEN | F_RESUMED, "block_ns": t0 + 1000,
                        "wake_ns": enter + 500, "resume_ns": enter + 900, "waker_ioctl_ns": enter,
                        "return_ns": enter + 1000, "waker_pid": 20, "waker_tid": 21,
                        "waker_nr": NR_CONTINUE, **kw})


def test_a_resolved_fault_takes_its_ioctls_exit_and_errno_only_from_it():
    """A repeated CONTINUE on the page (EEXIST) after the one that woke the thread is not
    charged to the fault: it appears as its own ioctl row."""
    t = 1000 * MS
    faults, ioctls = run(records(
        ioctl(t + 10_000, t + 12_000, woken=1),
        woken(t, t + 10_000),
        ioctl(t + 12_500, t + 13_000, ret=-17),
    ))
    (row,) = faults.itertuples()
    assert (row.resolver, row.handler_tid, row.errno, row.continue_ns) == ("CONTINUE", 21, 0, 2000)
    assert ioctls["errno"].tolist() == [0, 17] and ioctls["woken"].tolist() == [1, 0]
    assert ioctls["duration_ns"].tolist() == [2000, 500]


def test_a_fault_that_never_slept_is_given_the_ioctl_that_mapped_its_page():
    """The CONTINUE mapped the page before the thread slept, so no wakeup names it: the
    first ioctl of the same address space over the page, after the fault began, did it.
    One of another address space at the same address, and a failed one, did not. The fault
    waits for it across batches, its address space exact (a kernel pointer: in a float
    column its low bits would be lost and nothing would match)."""
    t = 1000 * MS
    faults, _ = run(
        records(fault(t, flags=F_MSG, msg_ns=t + 5_000, msg_flags=MINOR),
                ioctl(t + 6_000, t + 7_000, tid=22, mm=OTHER_MM),
                ioctl(t + 6_500, t + 7_500, tid=23, ret=-17)),
        records(ioctl(t + 8_000, t + 9_000, tid=24), ioctl(t + 9_500, t + 9_800, tid=25)),
    )
    (row,) = faults.itertuples()
    assert (row.outcome, row.resolver, row.handler_tid, row.handler_pid) == ("no_wait", "CONTINUE", 24, 20)
    assert (row.cont_enter_ns, row.continue_ns, row.errno) == (t + 8_000, 1000, 0)


def test_a_no_wait_fault_waits_for_its_ioctl_then_gives_up():
    t = 1000 * MS
    asm = Assembler(shmem_minor, sees_ioctls=True)
    assert asm.feed(records(fault(t, flags=F_MSG, msg_ns=t + 5_000))).faults.empty
    later = asm.feed(records(ioctl(t + 2_000 * MS, t + 2_000 * MS + 10, tid=30, start=0x1000)))
    (row,) = later.faults.itertuples()
    assert row.outcome == "no_wait" and pd.isna(row.resolver)


def test_unresolved_faults_name_no_resolver():
    """Killed inside the fault, or still asleep when tracing ended: whoever woke the thread
    (a signal, the exiting process) did not resolve it."""
    t = 1000 * MS
    faults, _ = run(records(
        fault(t, tid=11, flags=F_BLOCKED | F_SLEPT | F_WOKEN | F_RESUMED | F_EXITED,
              block_ns=t + 10, wake_ns=t + 5 * MS, resume_ns=t + 6 * MS, waker_pid=99,
              waker_tid=99),
        fault(t, tid=12, flags=F_BLOCKED | F_SLEPT | F_BLOCKED_AT_END, block_ns=t + 10),
    ))
    assert faults["outcome"].tolist() == ["unresolved_exit", "unresolved_end"]
    assert faults[["handler_pid", "handler_tid", "resolver", "errno"]].isna().all().all()
    assert faults["stall_ns"].tolist()[0] == 6 * MS


def test_batch_type():
    faults, ioctls = run(records())
    assert faults.empty and ioctls.empty
    assert isinstance(Assembler(shmem_minor, sees_ioctls=False).finish(), Batch)


def test_every_outcome_is_one_report_accepts():
    t = 1000 * MS
    flags = [0, F_WOKEN, F_WOKEN | F_EXITED, F_BLOCKED_AT_END, F_WOKEN | F_RELEASED,
             F_WOKEN | F_SIGNALLED]
    faults, _ = run(records(*(fault(t, tid=11 + i, flags=f | F_MSG, msg_ns=t + 1)
                              for i, f in enumerate(flags))))
    assert sorted(faults["outcome"]) == sorted(OUTCOMES)


def test_vcpu_from_qemu_thread_names_or_qmp():
    t = 1000 * MS
    asm = Assembler(shmem_minor, sees_ioctls=True, vcpus={13: 3})
    batch = asm.feed(records(woken(t, t + 10, tid=11, comm=b"CPU 1/TCG"),
                             woken(t, t + 10, tid=12, comm=b"CPU 0/KVM"),
                             woken(t, t + 10, tid=13, comm=b"qemu-system-x86"),
                             woken(t, t + 10, tid=14, comm=b"CPU 2/other")))
    vcpu = pd.concat([batch.faults, asm.finish().faults]).set_index("tid")["vcpu"]
    assert vcpu.loc[[11, 12, 13]].tolist() == [1, 0, 3] and pd.isna(vcpu.loc[14])
