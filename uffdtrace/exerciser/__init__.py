"""Workload exerciser: userfaultfd faulting threads and handlers in C, with ground truth.

    from uffdtrace.exerciser import ExerciseConfig, run
    res = run(ExerciseConfig(backing="shmem", pages=1000))

`res.faults`: one row per fault message the handlers read (tid, thread, addr, page, write,
start_ns, end_ns, stall_ns, msg_ns, handler_tid, flags, ptid); `res.ops`: one row per uffd
ioctl (handler_tid, op, role, start_ns, end_ns, addr, len, errno, mapped); `res.touches`: one
row per first touch (tid, thread, addr, page, write, start_ns, end_ns); `res.summary`: counts,
stall percentiles, rate, errors, verification. Times are CLOCK_MONOTONIC nanoseconds.

A fault's `tid` is always the faulting thread, taken from the exerciser's own touch records;
`ptid` is what the message said: the same tid, or 0 with `thread_id=False` (no
UFFD_FEATURE_THREAD_ID), where messages are matched to touches by page alone.
"""

from uffdtrace.exerciser.config import EXPECTED_MISUSE_ERRNO, MISUSES, ExerciseConfig
from uffdtrace.exerciser.driver import run
from uffdtrace.exerciser.hugepages import reserved_hugepages
from uffdtrace.exerciser.tables import ExerciseResult

__all__ = ["EXPECTED_MISUSE_ERRNO", "MISUSES", "ExerciseConfig", "ExerciseResult",
           "reserved_hugepages", "run"]
