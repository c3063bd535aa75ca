"""The kernel's own userfaultfd selftest (Linux 6.1) as a foreign workload, and a second count.

- `selftest_binary()`: the `userfaultfd` binary that `scripts/setup.sh` builds from Debian's
  `linux-source-6.1` in /var/cache/uffdtrace/selftests (UFFDTRACE_SELFTEST_DIR overrides);
  raises `SelftestMissing` (an AssertionError: the test fails, never skips) when it is not there.
- `parse_selftest_output()`: the selftest's own per-phase counts, the lines
  `userfaults: 827 missing (754+73+\\b) 2115 wp (1949+166+\\b)` (stress bounces, one count per
  CPU), `testing events (fork, remap, remove): userfaults: ...` and
  `testing minor faults: userfaults: 4096 minor (4096+\\b)`.
- `selftest_args()`: the command line for a memory type, with what it needs around it: for
  `hugetlb_shared`, hugepages added to the pool (and given back) and a hugetlbfs that holds
  them mounted (and unmounted) for its file.
- `IoctlCounter`: bpftrace (`foreign_count.bt`) alongside the workload, counting its resolving
  uffd ioctls by return value and reporting its UFFDIO_REGISTERs, independently of uffdtrace.
- `minor_phase_rows()`: the recorded rows that lie in a MINOR-registered range, from the
  registration on (see the function).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from uffdtrace.exerciser.hugepages import HUGEPAGE_SIZE, reserved_hugepages

SELFTEST_DIR = Path(os.environ.get("UFFDTRACE_SELFTEST_DIR", "/var/cache/uffdtrace/selftests"))
SELFTEST = SELFTEST_DIR / "userfaultfd"
COMM = "userfaultfd"  # the selftest's threads and its forked children keep the binary's name
COUNT_SCRIPT = Path(__file__).with_name("foreign_count.bt")

UFFDIO_REGISTER_MODE_MINOR = 1 << 2
EEXIST = 17
IOCTL_NAMES = {0xC020AA07: "CONTINUE", 0xC028AA03: "COPY", 0xC020AA04: "ZEROPAGE", 0x8010AA02: "WAKE"}
READY_CMD = 0x75666674  # "ufft": the ioctl that foreign_count.bt answers with "ready"
UFFD_EVENT_NAMES = {"pagefault", "fork", "remap", "remove", "unmap"}


class SelftestMissing(AssertionError):
    """The selftest binary was not built: a failure, not a skip."""


def selftest_binary() -> Path:
    if not os.access(SELFTEST, os.X_OK):
        raise SelftestMissing(
            f"{SELFTEST} is missing: run `bash scripts/setup.sh` as root (it installs "
            "linux-source-6.1 and builds the kernel's userfaultfd selftest there)")
    return SELFTEST


# --- the selftest's own counts ---------------------------------------------------------------

@dataclass(frozen=True)
class PhaseCounts:
    """One `userfaults:` line: totals per kind (the per-CPU parts are checked to add up)."""

    phase: str  # "bounces: 3, mode: rnd racing read", "testing minor faults", ...
    missing: int = 0
    wp: int = 0
    minor: int = 0


@dataclass
class SelftestOutput:
    nr_pages: int
    phases: list[PhaseCounts] = field(default_factory=list)

    @property
    def minor(self) -> int:
        return sum(p.minor for p in self.phases)

    @property
    def missing(self) -> int:
        return sum(p.missing for p in self.phases)

    @property
    def wp(self) -> int:
        return sum(p.wp for p in self.phases)


_COUNT = re.compile(r"(\d+) (missing|wp|minor) \(([0-9+]*)\x08?\)")


def parse_selftest_output(text: str) -> SelftestOutput:
    """The per-phase counts the 6.1 selftest prints (uffd_stats_report), from its stdout."""
    nr = re.search(r"^nr_pages: (\d+), nr_pages_per_cpu: \d+$", text, re.M)
    if not nr:
        raise ValueError(f"no 'nr_pages:' line in the selftest's output:\n{text}")
    out = SelftestOutput(int(nr.group(1)))
    for line in text.splitlines():
        if "userfaults:" not in line:
            continue
        head, _, tail = line.partition("userfaults:")
        counts = {}
        for total, kind, parts in _COUNT.findall(tail):
            per_cpu = [int(p) for p in parts.split("+") if p]
            if sum(per_cpu) != int(total):
                raise ValueError(f"per-CPU counts do not add up in {line!r}")
            counts[kind] = int(total)
        out.phases.append(PhaseCounts(head.strip().rstrip(",:").strip(), **counts))
    return out


# --- the workload's command line and environment ---------------------------------------------

@contextmanager
def hugetlbfs(where: Path, pages: int) -> Iterator[Path]:
    """A hugetlbfs of 2 MiB pages mounted on `where`, with `pages` of them reserved for it
    (`min_size`: no other user can take them meanwhile, unlike merely free ones); emptied
    and unmounted on the way out."""
    where.mkdir(parents=True, exist_ok=True)
    options = f"pagesize=2M,min_size={pages * HUGEPAGE_SIZE}"
    subprocess.run(["mount", "-t", "hugetlbfs", "-o", options, "none", str(where)],
                   check=True, capture_output=True, text=True)
    try:
        yield where
    finally:
        for f in where.iterdir():
            f.unlink()
        umount = subprocess.run(["umount", str(where)], capture_output=True, text=True)
        if umount.returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
            raise RuntimeError(f"could not unmount {where}: {umount.stderr.strip()}")


@contextmanager
def selftest_args(memory: str, mib: int, bounces: int, tmp: Path) -> Iterator[list[str]]:
    """Arguments of `userfaultfd` for `memory` (shmem or hugetlb_shared), ready to run inside.

    hugetlb_shared maps a file twice the area's size on a hugetlbfs (a source and a destination
    half, each `mib` MiB in pages of 2 MiB), so `mib` hugepages, plus a little slack."""
    args = [memory, str(mib), str(bounces)]
    with ExitStack() as stack:
        if memory.startswith("hugetlb"):
            pages = 2 * (mib << 20) // HUGEPAGE_SIZE + 4
            stack.enter_context(reserved_hugepages(pages))
            mount = stack.enter_context(hugetlbfs(tmp / "hugetlbfs", pages))
            args.append(str(mount / "selftest"))
        yield args


# --- the independent count: bpftrace ---------------------------------------------------------

def result_class(errno: int) -> str:
    """0 -> "ok", EEXIST -> "EEXIST", anything else -> "other"."""
    return "ok" if errno == 0 else "EEXIST" if errno == EEXIST else "other"


@dataclass(frozen=True)
class Register:
    """A UFFDIO_REGISTER seen by bpftrace; exit_ns is CLOCK_MONOTONIC, like the rows' times."""

    pid: int
    tid: int
    start: int
    len: int
    mode: int
    ret: int
    exit_ns: int


@dataclass
class IoctlCount:
    ioctls: dict[tuple[str, str], int] = field(default_factory=dict)  # (name, result) -> n
    registers: list[Register] = field(default_factory=list)

    def by_result(self, name: str) -> dict[str, int]:
        return {res: n for (op, res), n in sorted(self.ioctls.items()) if op == name and n}


class IoctlCounter:
    """bpftrace counting the workload's uffd ioctls, attached before the block runs.

        with IoctlCounter() as counter:
            subprocess.run([...])      # started by this process: its descendants are counted
        counter.result.by_result("CONTINUE")   # {"ok": 4096, "EEXIST": 4096}

    Entering waits until both ioctl tracepoints are attached (the magic ioctl is answered);
    leaving sends SIGINT, bpftrace prints @ioctls, and the output is parsed into `result`."""

    def __init__(self, comm: str = COMM, ready_timeout: float = 60.0) -> None:
        self.comm, self.ready_timeout = comm, ready_timeout
        self.lines: list[str] = []
        self.result = IoctlCount()
        self._ready = threading.Event()

    def __enter__(self) -> IoctlCounter:
        self.proc = subprocess.Popen(
            ["bpftrace", "-f", "json", str(COUNT_SCRIPT), self.comm, str(os.getpid())],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self._wait_ready()
        except TimeoutError as e:
            self._stop()
            raise RuntimeError(f"{e}: {self.stderr.strip()}") from None
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stop()
        if exc[0] is None:
            self._parse()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.strip() == '{"type": "printf", "data": "ready\\n"}':
                self._ready.set()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        try:
            while not self._ready.wait(0.05):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise TimeoutError(f"bpftrace did not get ready (exit {self.proc.poll()})")
                with suppress(OSError):  # ENOTTY: what matters is that bpftrace saw it
                    fcntl.ioctl(fd, READY_CMD)
        finally:
            os.close(fd)

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=10)
        self.stderr = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()

    def _parse(self) -> None:
        if self.proc.returncode != 0:
            raise RuntimeError(f"bpftrace exited {self.proc.returncode}: {self.stderr}")
        maps = 0
        for line in filter(str.strip, self.lines):  # bpftrace adds blank lines at exit
            msg = json.loads(line)
            if msg["type"] == "printf" and msg["data"].startswith("register "):
                self.result.registers.append(Register(*map(int, msg["data"].split()[1:])))
            elif msg["type"] == "map" and "@ioctls" in msg["data"]:
                maps += 1
                for key, n in msg["data"]["@ioctls"].items():
                    cmd, ret = (int(v) for v in key.split(","))
                    k = (IOCTL_NAMES[cmd], result_class(-ret))
                    self.result.ioctls[k] = self.result.ioctls.get(k, 0) + n
        if maps > 1:
            raise RuntimeError("bpftrace printed @ioctls more than once")


# --- selecting the rows of the minor phase ---------------------------------------------------

def minor_phase_rows(rows: pd.DataFrame, registers: list[Register]) -> pd.DataFrame:
    """The rows that can only be minor faults: in a range that was successfully registered
    MINOR, by the process that registered it, after the registration returned and before
    that process's next UFFDIO_REGISTER (the selftest registers MISSING|WP ranges in other
    phases, and a new phase may map its areas at the addresses of an old one's)."""
    mask = pd.Series(False, index=rows.index)
    ok = sorted((r for r in registers if r.ret == 0), key=lambda r: r.exit_ns)
    for i, reg in enumerate(ok):
        if not reg.mode & UFFDIO_REGISTER_MODE_MINOR:
            continue
        end = next((r.exit_ns for r in ok[i + 1:] if r.pid == reg.pid), float("inf"))
        mask |= ((rows["pid"] == reg.pid) & (rows["addr"] >= reg.start)
                 & (rows["addr"] < reg.start + reg.len)
                 & (rows["fault_ns"] > reg.exit_ns) & (rows["fault_ns"] < end))
    return rows[mask]
