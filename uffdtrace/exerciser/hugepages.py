"""Have enough free 2 MiB hugepages for a while, and give back what was added.

    with reserved_hugepages(16):
        ...   # 16 hugepages are free here (nr_hugepages raised if needed, as root)

On exit (also on exceptions, and on signals that the caller turns into exceptions) the pool
shrinks by exactly what was added, so concurrent and nested users compose: each takes back
only its own share. A lock file serialises the read-modify-write of nr_hugepages between
processes.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from uffdtrace.errors import UserError

HUGEPAGE_SIZE = 2 << 20
POOL = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
NR_HUGEPAGES = POOL / "nr_hugepages"  # = /proc/sys/vm/nr_hugepages where 2 MiB is the default
LOCK_FILE = Path("/run/lock/uffdtrace-hugepages.lock")


def _read(name: str) -> int:
    return int((POOL / name).read_text())


def nr_hugepages() -> int:
    """Size of the 2 MiB hugepage pool."""
    return _read("nr_hugepages")


def available_hugepages() -> int:
    """2 MiB hugepages free and not yet promised to a mapping."""
    return _read("free_hugepages") - _read("resv_hugepages")


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise UserError("cannot read MemAvailable from /proc/meminfo")


@contextmanager
def _pool_lock() -> Iterator[None]:
    try:
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:  # no /run/lock: go without (single user)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _grow(count: int) -> int:
    """Make `count` hugepages available; returns how many were added to the pool."""
    if not POOL.is_dir():
        raise UserError("this kernel has no 2 MiB hugetlb pages (no /sys/kernel/mm/hugepages)")
    with _pool_lock():
        missing = count - available_hugepages()
        if missing <= 0:
            return 0
        old = nr_hugepages()
        if os.geteuid() != 0:
            raise UserError(
                f"need {count} free 2 MiB hugepages, {count - missing} are; as root: "
                f"echo {old + missing} > /proc/sys/vm/nr_hugepages"
            )
        if missing * HUGEPAGE_SIZE > mem_available():
            raise UserError(
                f"{count} hugepages of 2 MiB need {missing * 2} MiB more than is free; "
                f"only {mem_available() >> 20} MiB is available"
            )
        NR_HUGEPAGES.write_text(str(old + missing))
        got = nr_hugepages() - old
        if got < missing:
            NR_HUGEPAGES.write_text(str(old))
            raise UserError(
                f"could only get {got} of the {missing} more 2 MiB hugepages needed "
                "(memory short or fragmented)"
            )
        return missing


def _shrink(added: int) -> None:
    with _pool_lock():
        NR_HUGEPAGES.write_text(str(max(nr_hugepages() - added, 0)))


@contextmanager
def reserved_hugepages(count: int) -> Iterator[None]:
    """Ensure `count` free 2 MiB hugepages inside the block (UserError if they cannot be had)."""
    added = _grow(count)
    try:
        yield
    finally:
        if added:
            _shrink(added)
