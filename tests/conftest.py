"""Shared fixtures for the real-kernel tests."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest

from uffdtrace.exerciser import hugepages
from uffdtrace.exerciser.hugepages import nr_hugepages
from uffdtrace.targets import alive

HANDLER_PROCESS_NAME = "uffdx-hprocess"  # comm of the exerciser's handler process

# --- What a test needs of the machine: the markers root, hugepages, netns and qemu ----------
# (registered in pyproject.toml). Checked before the test and its fixtures start: a test that
# needs what this machine lacks fails, naming what is missing. It is never skipped. tests/unit
# needs none of them.

UNIT_TESTS = Path(__file__).parent / "unit"
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def _lacks_root() -> str | None:
    return None if os.geteuid() == 0 else "needs root (BPF, userfaultfd): run the tests as root"


def _lacks_hugepages() -> str | None:
    if os.access(NR_HUGEPAGES, os.W_OK):
        return None
    return (f"needs hugepages: {NR_HUGEPAGES} is not writable here (reserving hugepages takes root "
            "and a kernel with hugetlbfs)")


def _lacks_netns() -> str | None:
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"needs network namespaces: `ip netns` is unusable ({e}; apt-get install iproute2)"
    if out.returncode != 0:
        return f"needs network namespaces: `ip netns list` failed: {out.stderr.strip()}"
    return None


def _lacks_qemu() -> str | None:
    if shutil.which("qemu-system-x86_64"):
        return None
    return "needs qemu-system-x86_64: apt-get install qemu-system-x86 (or run `make setup`)"


MACHINE_NEEDS: dict[str, Callable[[], str | None]] = {
    "root": _lacks_root, "hugepages": _lacks_hugepages, "netns": _lacks_netns, "qemu": _lacks_qemu}


@functools.cache
def lacking(need: str) -> str | None:
    """Why this machine cannot give a test `need` (None: it can), found once per run."""
    return MACHINE_NEEDS[need]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    needs = list(dict.fromkeys(m.name for m in item.iter_markers() if m.name in MACHINE_NEEDS))
    if not needs:
        return
    if item.path.is_relative_to(UNIT_TESTS):
        pytest.fail(f"marked {', '.join(needs)}: tests/unit runs without root, BPF or a kernel, so "
                    "this test belongs in tests/", pytrace=False)
    missing = [why for why in map(lacking, needs) if why]
    if missing:
        pytest.fail("; ".join(missing), pytrace=False)



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
        try:
            children.update(int(c) for c in (task / "children").read_text().split())
        except FileNotFoundError:  # the thread ended since the listing (the exerciser's own)
            continue
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


@contextlib.contextmanager
def reaped(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """`proc`, killed and waited for on the way out (nothing left to kill once it has ended):
    a check that fails inside leaves no process behind."""
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def tracing_started(proc: subprocess.Popen) -> tuple[str, set[int]]:
    """Wait for `uffdtrace record` to say it traces; its stderr so far and its BPF programs,
    all of them ours."""
    err = read_stderr_until(proc, "started in")
    held = held_bpf_programs(proc.pid)
    loaded = loaded_bpf_programs()
    assert held and {loaded[i] for i in held} <= OUR_PROGRAM_NAMES, (held, loaded)
    return err, held


# --- What a run must leave as it found it (fault injection, issue #16) ----------------------

BPF_STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
BPF_STATS_FD = "anon_inode:bpf-stats"  # an fd of BPF_ENABLE_STATS: the stats stay on while held


def bpf_stats_holders(pids: Iterable[int] | None = None) -> set[int]:
    """Processes (of `pids`, or all) holding a BPF_ENABLE_STATS fd: while one does, the sysctl
    reads 1 whatever was written to it."""
    found = set()
    for pid in (pids if pids is not None else (int(p.name) for p in Path("/proc").glob("[0-9]*"))):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) == BPF_STATS_FD for fd in Path(f"/proc/{pid}/fd").iterdir()):
                found.add(pid)
    return found


def hugepage_ledger() -> dict[int, int]:
    """What the reservations in the ledger added, by the adding pid (hold the pool's lock for
    a consistent view)."""
    added: dict[int, int] = {}
    for entry in hugepages.LEDGER.iterdir() if hugepages.LEDGER.is_dir() else ():
        if m := hugepages.LEDGER_ENTRY.match(entry.name):
            added[int(m[1])] = added.get(int(m[1]), 0) + int(m[3])
    return added


def hugepage_pool() -> tuple[int, dict[int, int]]:
    """nr_hugepages and the ledger, read together under the pool's lock (so no run is between
    noting and growing)."""
    with hugepages._pool_lock():
        return nr_hugepages(), hugepage_ledger()


def hugepage_base() -> int:
    """nr_hugepages net of what the reservations in the ledger added (live ones, and killed ones
    not yet given back): the same before and after a run that gave back its own."""
    nr, ledger = hugepage_pool()
    return nr - sum(ledger.values())


def net_objects() -> set[str]:
    """Network namespaces (`ip netns list`) and veth links of the root namespace."""
    names = {line.split()[0] for line in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.splitlines()
        if line.strip()}
    links = json.loads(subprocess.run(["ip", "-j", "link", "show", "type", "veth"],
                                      capture_output=True, text=True, check=True).stdout or "[]")
    return names | {link["ifname"].split("@")[0] for link in links}


def creator(name: str) -> int | None:
    """The pid in a name `uffdtrace migrate` gave its namespace or veth end."""
    from uffdtrace.migration import link  # pyroute2: only where namespaces are looked at

    m = link.NS_PATTERN.match(name) or link.VETH_PATTERN.match(name)
    return int(m[1]) if m else None


def group_members(pgid: int) -> set[int]:
    """Live (not zombie) processes of process group `pgid`."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == pgid and state not in "ZX":
                members.add(int(stat.parent.name))
    return members


def build_c(tmp_path_factory: pytest.TempPathFactory, source: str, name: str) -> Path:
    """tests/SOURCE compiled (cc -O2 -pthread) as NAME, which its processes are called."""
    binary = tmp_path_factory.mktemp(name) / name
    subprocess.run(["cc", "-O2", "-pthread", "-o", str(binary), str(Path(__file__).with_name(source))],
                   check=True)
    return binary


def wait_until(done: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.05) -> object:
    """done()'s first true value, polled until a generous `timeout_s`; fails naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not (value := done()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g} s"
        time.sleep(poll_s)
    return value


@dataclass(frozen=True)
class MachineState:
    """What a run may change while it runs and must leave as it found it: BPF stats, the
    hugepage pool, network namespaces and veth links. Other tests may run at the same time, so
    changes that their live processes explain are not ours: hugepages are compared net of the
    ledger (nr_hugepages minus what each live reservation added, under the pool's lock), a new
    namespace or link must belong to a live `migrate` of someone else, and the stats sysctl may
    differ only while another process holds (or held) a stats fd."""

    bpf_stats: str
    bpf_stats_holders: frozenset[int]
    nr_hugepages: int
    ledger: dict[int, int]
    net: frozenset[str]

    @classmethod
    def now(cls) -> MachineState:
        nr, ledger = hugepage_pool()
        return cls(BPF_STATS_SYSCTL.read_text().strip(), frozenset(bpf_stats_holders()), nr,
                   ledger, frozenset(net_objects()))

    def check_restored(self, *, bpf_programs: Iterable[int] = (), pgids: Iterable[int] = (),
                       pids: Iterable[int] = (), wait_s: float = 180.0) -> None:
        """After a run: its process groups empty (waited for: a workload may run on after its
        tracer died), then no BPF program it held, nothing of `pids` (the run's processes) in
        the hugepage ledger or in network names, and the rest as before."""
        for pgid in pgids:
            wait_until(lambda pgid=pgid: not group_members(pgid), wait_s,
                       f"processes of group {pgid} still alive: {group_members(pgid)}")
        assert not still_loaded(set(bpf_programs)), "BPF programs of the run still loaded"

        ours = set(pids) | set(pgids)
        nr, ledger = hugepage_pool()
        assert not ours & ledger.keys(), f"hugepages of the run not given back: {ledger}"
        base = self.nr_hugepages - sum(self.ledger.values())
        wait_until(lambda: hugepage_base() == base, 30,
                   f"nr_hugepages {self.nr_hugepages} -> {nr} (ledger {self.ledger} -> {ledger})")

        new = {n: creator(n) for n in net_objects() - self.net}
        assert all(pid and pid not in ours and alive(pid) for pid in new.values()), \
            f"network namespaces or links left: {sorted(new)}"

        def stats_explained() -> bool:
            stats = BPF_STATS_SYSCTL.read_text().strip()
            if stats == self.bpf_stats:
                return True
            return bool((self.bpf_stats_holders if stats == "0" else bpf_stats_holders()) - ours)

        wait_until(stats_explained, 30, f"bpf_stats_enabled was {self.bpf_stats}, and no other "
                                        "holder of a stats fd explains the change")


def whole_rows(text: str) -> pd.DataFrame:
    """The CSV, once checked whole: it ends with a row's newline and every row has the header's
    fields."""
    assert text.endswith("\n"), text[-200:]
    header, *rows = csv.reader(io.StringIO(text))
    assert all(len(row) == len(header) for row in rows)
    df = pd.read_csv(io.StringIO(text))
    assert list(df.columns) == header and len(df) == len(rows)
    return df


def report_accepts(path: Path, *args: str) -> None:
    """`uffdtrace report PATH ARGS` reads it and exits 0."""
    out = subprocess.run([sys.executable, "-m", "uffdtrace", "report", str(path), *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
