"""Shared fixtures for the real-kernel tests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from importlib import resources
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


# --- BPF programs of a tracer, and its start ------------------------------------------------

OUR_PROBES = re.findall(r"^RAW_TRACEPOINT_PROBE\((\w+)\)",
                        resources.files("uffdtrace.bpf").joinpath("tracepoint.c").read_text(), re.M)
# BCC names a program after its function (with BTF) or after the tracepoint; the kernel keeps 15 chars
OUR_PROGRAM_NAMES = {n[:k] for p in OUR_PROBES for n in (p, f"raw_tracepoint__{p}") for k in (15, None)}


def loaded_bpf_programs() -> dict[int, str]:
    """Every BPF program loaded now, by `bpftool prog show`: id -> name."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True, timeout=30)
    return {p["id"]: p.get("name", "") for p in json.loads(out.stdout or "[]")}


def held_bpf_programs(pid: int) -> set[int]:
    """Ids of the BPF programs a process holds an fd of (the program or its link)."""
    ids = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            ids.update(int(line.split()[1]) for line in info.read_text().splitlines()
                       if line.startswith("prog_id:"))
    return ids


def still_loaded(ids: set[int], wait_s: float = 10.0) -> set[int]:
    """Those of `ids` still loaded once the kernel has had up to `wait_s` to free them."""
    deadline = time.monotonic() + wait_s
    while (left := ids & loaded_bpf_programs().keys()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def read_stderr_until(proc: subprocess.Popen, text: str, timeout_s: float = 120.0) -> str:
    """proc's stderr (text mode) up to and including the first line containing `text`; proc is
    killed if that takes longer than timeout_s."""
    watchdog = threading.Timer(timeout_s, proc.kill)
    watchdog.start()
    try:
        lines = []
        while not lines or text not in lines[-1]:
            line = proc.stderr.readline()
            assert line, f"{text!r} never came:\n{''.join(lines)}"
            lines.append(line)
    finally:
        watchdog.cancel()
    return "".join(lines)


def tracing_started(proc: subprocess.Popen) -> tuple[str, set[int]]:
    """Wait for `uffdtrace record` to say it traces; its stderr so far and its BPF programs,
    all of them ours."""
    err = read_stderr_until(proc, "started in")
    held = held_bpf_programs(proc.pid)
    loaded = loaded_bpf_programs()
    assert held and {loaded[i] for i in held} <= OUR_PROGRAM_NAMES, (held, loaded)
    return err, held
