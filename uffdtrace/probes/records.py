"""The raw records our BPF programs emit (struct event in bpf/*.c), as a numpy dtype."""

from __future__ import annotations

import numpy as np

EV_FAULT, EV_IOCTL = 1, 2

# struct event flags for EV_FAULT
F_NOTIFIED = 1
F_BLOCKED = 2
F_WOKEN = 4
F_WOKEN_ON_CPU = 8
F_EXITED = 16
F_MSG = 32
F_SLEPT = 64
F_OTHER_SLEEP = 128
F_RESUMED = 256
F_OFF_AGAIN = 512
F_UFFD = 1024  # kprobe backend: the fault entered handle_userfault; `mapped` holds its reason
F_HUGETLB = 2048
F_SHMEM = 4096
F_ACTIVE = 8192  # BPF state only (a fault in flight); never set in records
F_BLOCKED_AT_END = 16384  # set by user space: still asleep in the fault when tracing ended
F_RELEASED = 32768  # woken by its userfaultfd's release, not by an ioctl (ioctls traced)
F_SIGNALLED = 65536  # woken by neither a uffd ioctl nor the release: a signal (ioctls traced)

# struct event flags for EV_IOCTL (kprobe backend): kernel functions the ioctl went through
IO_MFILL = 1  # its mcopy/mfill function; t2 = time inside
IO_HUGETLB = 2  # a hugetlb PTE install   } t3 = time inside the outermost PTE-install
IO_SHMEM = 4  # shmem's PTE install        } functions, summed over pages
IO_PTE = 8  # the generic PTE install      }

EVENT_DTYPE = np.dtype(
    [
        ("type", np.uint8),
        ("nr", np.uint8),
        ("woken", np.uint16),
        ("flags", np.uint32),
        ("pid", np.uint32),
        ("tid", np.uint32),
        ("peer_pid", np.uint32),
        ("peer_tid", np.uint32),
        ("notify_tid", np.uint32),
        ("gen", np.uint32),
        ("t0", np.uint64),
        ("t1", np.uint64),
        ("t2", np.uint64),
        ("t3", np.uint64),
        ("t4", np.uint64),
        ("t5", np.uint64),
        ("t6", np.uint64),
        ("addr", np.uint64),
        ("len", np.uint64),
        ("x", np.uint64),
        ("ret", np.int64),
        ("mapped", np.int64),
        ("mm", np.uint64),
        ("comm", "S16"),
    ],
    align=True,  # C's layout: padding where struct event has it
)
assert EVENT_DTYPE.itemsize == 152

LOST_REASONS = ("ringbuf_full", "inflight_map_full", "ioctl_map_full")

# _IOC_NR of the UFFDIO_* ioctls (DESIGN §3)
UFFDIO_NAMES = {
    0x3F: "API",
    0x00: "REGISTER",
    0x01: "UNREGISTER",
    0x02: "WAKE",
    0x03: "COPY",
    0x04: "ZEROPAGE",
    0x06: "WRITEPROTECT",
    0x07: "CONTINUE",
    0x08: "POISON",
    0x05: "MOVE",
}

UFFD_EVENTS = {0x12: "pagefault", 0x13: "fork", 0x14: "remap", 0x15: "remove", 0x16: "unmap"}
UFFD_PAGEFAULT_FLAG_WRITE, UFFD_PAGEFAULT_FLAG_WP, UFFD_PAGEFAULT_FLAG_MINOR = 1, 2, 4
