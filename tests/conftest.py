"""Shared fixtures for the real-kernel tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from uffdtrace.exerciser.hugepages import nr_hugepages

HANDLER_PROCESS_NAME = "uffdx-hprocess"  # comm of the exerciser's handler process


def handler_processes(parent: int | None = None) -> set[int]:
    """Pids of live exerciser handler processes (of `parent` only, if given)."""
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "comm").read_text().strip() != HANDLER_PROCESS_NAME:
                continue
            status = (proc / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("State", "").startswith("Z"):
            continue
        if parent is None or int(fields["PPid"]) == parent:
            found.add(int(proc.name))
    return found


def child_processes(pid: int | None = None) -> set[int]:
    """Children (zombies included) of `pid` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children.update(int(c) for c in (task / "children").read_text().split())
    return children


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """The test must leave nr_hugepages as it was, and no child or handler process behind."""
    hugepages, children, handlers = nr_hugepages(), child_processes(), handler_processes()
    yield
    assert nr_hugepages() == hugepages, "nr_hugepages not restored"
    assert child_processes() <= children, "child process left behind"
    assert handler_processes() <= handlers, "exerciser handler process left behind"
