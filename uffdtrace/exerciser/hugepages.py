"""Have enough free 2 MiB hugepages for a while, and give back what was added.

    with reserved_hugepages(16):
        ...   # 16 hugepages are free here (nr_hugepages raised if needed, as root)

On exit (also on exceptions, and on signals that the caller turns into exceptions) the pool
shrinks by exactly what was added, so concurrent and nested users compose: each takes back
only its own share. A lock file serialises the read-modify-write of nr_hugepages between
processes. What a reservation adds is noted in a ledger before the pool grows, with the
adding process's pid and start time: the next reservation gives back the pages of runs that
died without shrinking (SIGKILL).
"""

from __future__ import annotations

import fcntl
import itertools
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from uffdtrace.errors import UserError

HUGEPAGE_SIZE = 2 << 20
POOL = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
NR_HUGEPAGES = POOL / "nr_hugepages"  # = /proc/sys/vm/nr_hugepages where 2 MiB is the default
LOCK_FILE = Path("/run/lock/uffdtrace-hugepages.lock")
# One empty file per reservation that added pages, named PID-START-SERIAL-ADDED: created in one
# step before the pool grows, removed before the pages go back (a kill in between leaks them
# rather than giving them back twice).
LEDGER = Path("/run/uffdtrace/hugepages")
LEDGER_ENTRY = re.compile(r"^(\d+)-(\d+)-\d+-(\d+)$")
_serial = itertools.count()  # several reservations of one process get distinct entries


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


def _grow(count: int) -> Path | None:
    """Make `count` hugepages available; returns the ledger entry of what was added, if any."""
    if not POOL.is_dir():
        raise UserError("this kernel has no 2 MiB hugetlb pages (no /sys/kernel/mm/hugepages)")
    with _pool_lock():
        if os.geteuid() == 0:
            _return_orphans()
        missing = count - available_hugepages()
        if missing <= 0:
            return None
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
        entry = _note(missing)
        NR_HUGEPAGES.write_text(str(old + missing))
        got = nr_hugepages() - old
        if got < missing:
            entry.unlink()
            NR_HUGEPAGES.write_text(str(old))
            raise UserError(
                f"could only get {got} of the {missing} more 2 MiB hugepages needed "
                "(memory short or fragmented)"
            )
        return entry


def _shrink(entry: Path) -> None:
    with _pool_lock():
        entry.unlink(missing_ok=True)
        _give_back(int(entry.name.rsplit("-", 1)[1]))


def _give_back(added: int) -> None:
    NR_HUGEPAGES.write_text(str(max(nr_hugepages() - added, 0)))


def _start_time(pid: int) -> int | None:
    """When a live process started (field 22 of /proc/PID/stat), None without one (zombies
    included): with the pid, it names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, *fields = stat.rsplit(")", 1)[1].split()  # comm, in parentheses, may hold anything
    return None if state in "ZX" else int(fields[18])


def _note(added: int) -> Path:
    """Enter in the ledger, before the pool grows, what this process is about to add."""
    pid = os.getpid()
    LEDGER.mkdir(parents=True, exist_ok=True)
    entry = LEDGER / f"{pid}-{_start_time(pid)}-{next(_serial)}-{added}"
    entry.touch(exist_ok=False)
    return entry


def _return_orphans() -> None:
    """Give back what runs that are gone added, and drop their entries (under the pool lock)."""
    if not LEDGER.is_dir():
        return
    for entry in LEDGER.iterdir():
        m = LEDGER_ENTRY.match(entry.name)
        if m and _start_time(int(m[1])) != int(m[2]):
            entry.unlink()
            _give_back(int(m[3]))


@contextmanager
def reserved_hugepages(count: int) -> Iterator[None]:
    """Ensure `count` free 2 MiB hugepages inside the block (UserError if they cannot be had)."""
    entry = _grow(count)
    try:
        yield
    finally:
        if entry is not None:
            _shrink(entry)
