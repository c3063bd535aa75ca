"""A real QEMU post-copy live migration on 127.0.0.1, its destination traced by `uffdtrace record`.

Two `qemu-system-x86_64` (Debian's 7.2), both `-accel tcg`, boot Debian's 6.1 kernel with a
busybox initramfs built here at run time (GUEST_INIT: tmpfs files rewritten and read in a
loop, ~40 MiB of awk strings read at random), 2 vCPUs (`-smp 2`, MTTCG: threads `CPU 0/TCG`
and `CPU 1/TCG` with `-name NAME,debug-threads=on`), 256 MiB, no disk, no network device.
The destination waits with `-incoming defer`; QMP (`qemu.qmp`, over unix sockets) sets
`postcopy-ram` + `postcopy-blocktime` on both sides, starts the incoming side on an ephemeral
port, and starts `migrate`, then `migrate-start-postcopy` after `postcopy_after_s`.
`max-postcopy-bandwidth` (32 MiB/s; QEMU ignores `max-bandwidth` in post-copy) makes
post-copy last 2-4 s, so the guest faults on pages it has not got yet. Precopy runs 1.2 s at
32 MiB/s first. A run takes ~15 s here: guest boot (~4 s) alongside
record's start-up (BCC compile, ~5 s), 1.2 s precopy, 2-4 s post-copy, ~1 s to stop record.

What QEMU says on its own, to hold the recording against:
- the destination's trace events (`-trace events=FILE -D LOG -msg timestamp=on`: each line is
  `TID@SEC.USEC:event args`, CLOCK_REALTIME): every uffd message its fault thread read
  (`postcopy_ram_fault_thread_request`, with the faulting thread's id), every page it placed
  (`postcopy_place_page` after a successful UFFDIO_COPY, `postcopy_place_page_zero` just
  before a UFFDIO_ZEROPAGE: in 7.2 a failed placement fails the migration), every page that
  arrived in post-copy (`ram_load_postcopy_loop`), and the blocktime bookkeeping
  (`mark_postcopy_blocktime_begin/end`);
- `query-migrate` on both sides at the end: the destination's `postcopy-blocktime` and
  `postcopy-vcpu-blocktime` (ms), the source's `ram.postcopy-requests` and times.

The guest is booted through PVH: the kernel's xz-compressed vmlinux is extracted from
/boot/vmlinuz-6.1.* (Python's lzma, ~1 s) and given to `-kernel` as an ELF, which skips the
in-guest xz decompression (about 9 s under TCG) and boots to /init in about 4 s.

No process outlives `run_postcopy()`: both QEMUs and the recorder are killed on every way
out (and get SIGKILL / SIGTERM from the kernel should this process die: PR_SET_PDEATHSIG).

    python -m tests.qemu_postcopy --out DIR [--memory anon|memfd] [--smp N]

runs one traced migration by hand and prints QEMU's numbers and ours.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib.util
import json
import lzma
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from uffdtrace.commands.report import read_faults
from uffdtrace.plugins import RunContext
from uffdtrace_plugins.qemu import QemuPlugin

PROJECT = Path(__file__).resolve().parents[1]
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
KERNEL_GLOB = "vmlinuz-6.1.*"
INSTALL = {
    QEMU: "apt-get install qemu-system-x86",
    "busybox": "apt-get install busybox-static",
    "kernel": "apt-get install linux-image-amd64 (Debian 12's 6.1 kernel)",
    "qemu.qmp": ".venv/bin/pip install qemu.qmp (the project's test extras)",
}

# The destination's trace events (names checked against `qemu-system-x86_64 -trace help`, 7.2).
TRACE_EVENTS = (
    "postcopy_ram_fault_thread_request",  # a uffd message read by the fault thread
    "postcopy_place_page",                 # UFFDIO_COPY succeeded (printed after it)
    "postcopy_place_page_zero",            # UFFDIO_ZEROPAGE about to be issued
    "ram_load_postcopy_loop",              # a page arrived in post-copy
    "mark_postcopy_blocktime_begin",
    "mark_postcopy_blocktime_end",
    "postcopy_page_req_add",
    "postcopy_page_req_del",
    "postcopy_ram_enable_notify",          # uffd registered on the RAM blocks
    "loadvm_postcopy_handle_listen",
    "loadvm_postcopy_handle_run",          # post-copy: the destination's vCPUs start
    "loadvm_postcopy_handle_run_bh",
    "postcopy_ram_fault_thread_entry",
    "postcopy_ram_fault_thread_exit",
    "postcopy_ram_incoming_cleanup_entry",  # post-copy over: uffd unregistered, closed
    "postcopy_ram_incoming_cleanup_blocktime",
    "postcopy_ram_incoming_cleanup_exit",
)

# The guest's /init (PID 1 ends up being awk). A writer loop rewrites a 24 MiB tmpfs file of
# random bytes (`seed`, 4 MiB, repeated) and an 8 MiB file of zeros, and reads both back (QEMU
# sends zero pages as a flag and places them with UFFDIO_ZEROPAGE, others with UFFDIO_COPY);
# awk holds `uffdguest.pages` strings of ~4 KiB (40 MiB) and reads them at random. Sequential
# access alone hardly faults: after each page request QEMU's source goes on streaming from the
# requested page, ahead of a sequential reader. With 2 vCPUs (writer and reader each on one)
# the destination sees ~50-400 faults in 2-4 s of post-copy. (Each fault waits 1-100 ms: 7.2
# serves a page request only once the rate limiter lets the stream go on, and behind what the
# socket already holds; so faults are few, whatever the bandwidth.)
GUEST_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=90% tmpfs /mnt
pages=0
for a in $(cat /proc/cmdline); do case $a in uffdguest.pages=*) pages=${a#*=};; esac; done
dd if=/dev/urandom of=/mnt/seed bs=1M count=4 2>/dev/null
echo "uffdguest: up"
(
  i=0
  while true; do
    cat /mnt/seed /mnt/seed /mnt/seed /mnt/seed /mnt/seed /mnt/seed > /mnt/a
    dd if=/dev/zero of=/mnt/z bs=1M count=8 2>/dev/null
    cat /mnt/a /mnt/z > /dev/null
    i=$((i+1))
    echo "uffdguest: dirty $i"
  done
) &
exec awk -v n=$pages 'BEGIN {
  s = sprintf("%4000s", "")
  for (i = 0; i < n; i++) a[i] = s i
  srand()
  for (r = 1; ; r++) {
    for (k = 0; k < 5000; k++) t += length(a[int(rand() * n)])
    print "uffdguest: round " r
  }
}'
"""
READY_ROUNDS = 2  # the loop has run this many rounds: its files exist, it is dirtying


class QemuSetupMissing(AssertionError):
    """A tool the run needs is not installed: a failure naming the package, never a skip."""


class MigrationError(RuntimeError):
    """The migration (or the recorder) did not do what it should, or timed out."""


# --- the guest -------------------------------------------------------------------------------

def _version_key(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def _is_static_elf(path: Path) -> bool:
    """An ELF with no PT_INTERP (busybox-static's, not the dynamically linked `busybox`)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff = int.from_bytes(data[32:40], "little")
    phentsize, phnum = (int.from_bytes(data[o:o + 2], "little") for o in (54, 56))
    return all(int.from_bytes(data[phoff + i * phentsize:phoff + i * phentsize + 4], "little") != 3
               for i in range(phnum))


def check_tools(boot: Path = Path("/boot")) -> tuple[str, Path]:
    """(qemu binary, kernel image), or QemuSetupMissing naming what to install."""
    missing = []
    qemu = shutil.which(QEMU)
    if qemu is None:
        missing.append(f"{QEMU}: {INSTALL[QEMU]}")
    kernels = sorted(boot.glob(KERNEL_GLOB), key=lambda p: _version_key(p.name))
    if not kernels:
        missing.append(f"{boot}/{KERNEL_GLOB}: {INSTALL['kernel']}")
    if not (BUSYBOX.is_file() and _is_static_elf(BUSYBOX)):
        missing.append(f"a static {BUSYBOX}: {INSTALL['busybox']}")
    if importlib.util.find_spec("qemu") is None or importlib.util.find_spec("qemu.qmp") is None:
        missing.append(f"the Python package qemu.qmp: {INSTALL['qemu.qmp']}")
    if missing:
        raise QemuSetupMissing("QEMU post-copy test cannot run, missing: " + "; ".join(missing))
    assert qemu is not None
    return qemu, kernels[-1]


def _newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the kernel's initramfs format ("newc"): (name, mode, data) each."""
    out = bytearray()

    def add(name: str, mode: int, data: bytes, ino: int) -> None:
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate(entries, 1):
        add(name, mode, data, ino)
    add("TRAILER!!!", 0, b"", 0)
    return bytes(out)


@dataclass(frozen=True)
class Guest:
    vmlinux: Path  # ELF, booted through its PVH entry
    initrd: Path
    kernel_image: Path  # the /boot/vmlinuz it came from


def build_guest(directory: Path, kernel: Path | None = None) -> Guest:
    """The guest's kernel (vmlinux extracted from the bzImage) and initramfs, in `directory`."""
    if kernel is None:
        _, kernel = check_tools()
    directory.mkdir(parents=True, exist_ok=True)
    image = kernel.read_bytes()
    start = image.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise QemuSetupMissing(f"{kernel} is not an xz-compressed bzImage (Debian's is): "
                               "cannot extract its vmlinux")
    vmlinux = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(image[start:])
    if vmlinux[:4] != b"\x7fELF":
        raise QemuSetupMissing(f"{kernel}: the xz stream is not an ELF vmlinux")
    (directory / "vmlinux").write_bytes(vmlinux)
    d, x, r = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFREG | 0o644
    entries = [(name, d, b"") for name in ("bin", "dev", "proc", "sys", "mnt", "tmp")]
    entries += [("bin/busybox", x, BUSYBOX.read_bytes()), ("init", x, GUEST_INIT.encode()),
                ("etc", d, b""), ("etc/hostname", r, b"uffdguest\n")]
    (directory / "initrd.cpio").write_bytes(_newc(entries))
    return Guest(directory / "vmlinux", directory / "initrd.cpio", kernel)


# --- processes -------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int) -> Callable[[], None]:
    def preexec() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    return preexec


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        with suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def thread_names(pid: int) -> dict[int, str]:
    names = {}
    for task in Path(f"/proc/{pid}/task").glob("[0-9]*"):
        with suppress(OSError):
            names[int(task.name)] = (task / "comm").read_text().strip()
    return names


def realtime_minus_monotonic_ns() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC now (the tightest of a few samples): QEMU's trace
    times are gettimeofday(), the rows' bpf_ktime_get_ns()."""
    best = None
    for _ in range(20):
        m0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        r = time.clock_gettime_ns(time.CLOCK_REALTIME)
        m1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if best is None or m1 - m0 < best[0]:
            best = (m1 - m0, r - (m0 + m1) // 2)
    assert best is not None
    return best[1]


@dataclass
class Config:
    memory: str = "anon"  # "anon": QEMU's default RAM; "memfd": memory-backend-memfd share=on
    mem_mib: int = 256
    pages: int = 10000  # the guest's awk holds this many strings of ~4 KiB and reads them at random
    smp: int = 2
    precopy_bandwidth: int = 32 << 20  # bytes/s: max-bandwidth
    postcopy_bandwidth: int = 32 << 20  # bytes/s: max-postcopy-bandwidth
    postcopy_after_s: float = 1.2  # migrate-start-postcopy this long after migrate
    extra_caps: tuple[str, ...] = ()
    record: bool = True
    record_mode: str = "full"
    boot_timeout_s: float = 60.0
    record_ready_timeout_s: float = 120.0
    migration_timeout_s: float = 90.0
    record_stop_timeout_s: float = 60.0


@dataclass
class Result:
    config: Config
    workdir: Path
    src_pid: int = 0
    dst_pid: int = 0
    dst_threads: dict[int, str] = field(default_factory=dict)  # every thread seen, tid -> comm
    clock_offsets_ns: list[int] = field(default_factory=list)  # REALTIME - MONOTONIC, before/after
    times: dict[str, float] = field(default_factory=dict)  # monotonic s of the steps
    src_info: dict[str, Any] = field(default_factory=dict)  # query-migrate at the end
    dst_info: dict[str, Any] = field(default_factory=dict)
    trace: pd.DataFrame | None = None  # the destination's trace events, parsed
    rows: pd.DataFrame | None = None  # record's fault CSV
    ioctls: pd.DataFrame | None = None  # record's ioctl CSV
    summary: dict[str, Any] = field(default_factory=dict)  # record --json
    record_stderr: str = ""

    def events(self, name: str) -> pd.DataFrame:
        assert self.trace is not None
        return self.trace[self.trace["event"] == name]

    @property
    def clock_offset_ns(self) -> int:
        return sum(self.clock_offsets_ns) // max(1, len(self.clock_offsets_ns))

    def save(self) -> None:
        """run.json beside the logs: what `load()` needs to compare again offline."""
        state = {k: getattr(self, k) for k in ("src_pid", "dst_pid", "clock_offsets_ns", "times",
                                               "src_info", "dst_info")}
        state["dst_threads"] = {str(k): v for k, v in self.dst_threads.items()}
        state["config"] = vars(self.config)
        (self.workdir / "run.json").write_text(json.dumps(state, indent=1, default=str))


def load(workdir: Path) -> Result:
    """A finished run's Result, from its directory."""
    state = json.loads((workdir / "run.json").read_text())
    config = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in state.pop("config").items()})
    threads = {int(k): v for k, v in state.pop("dst_threads").items()}
    result = Result(config, workdir, dst_threads=threads, **state)
    result.trace = parse_trace(workdir / "dst.trace")
    if config.record:
        result.summary = json.loads((workdir / "record.json").read_text())
        result.rows = pd.read_csv(workdir / "rec.csv")
        if config.record_mode == "full":
            result.ioctls = pd.read_csv(workdir / "ioctls.csv")
    return result


class _Qemu:
    """One QEMU process with its QMP client."""

    def __init__(self, name: str, argv: list[str], workdir: Path, sockdir: Path) -> None:
        self.name, self.workdir = name, workdir
        self.sock = sockdir / f"{name}.qmp"  # short: sun_path holds 108 bytes
        self.stderr_path = workdir / f"{name}.stderr"
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [*argv, "-qmp", f"unix:{self.sock},server=on,wait=off"],
                stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent(signal.SIGKILL))
        self.qmp: Any = None

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise MigrationError(f"{self.name} QEMU exited {self.proc.returncode}: "
                                 f"{self.stderr_path.read_text(errors='replace')[-2000:]}")

    async def connect(self, timeout_s: float = 20.0) -> None:
        from qemu.qmp import QMPClient

        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            if not self.sock.exists():  # QEMU has not created it yet
                if time.monotonic() > deadline:
                    raise MigrationError(f"{self.name}: no QMP socket {self.sock} after {timeout_s} s")
                await asyncio.sleep(0.05)
                continue
            client = QMPClient(self.name)
            try:
                await client.connect(str(self.sock))
                self.qmp = client
                return
            except Exception as e:  # the socket is not there yet
                if time.monotonic() > deadline:
                    raise MigrationError(f"{self.name}: no QMP on {self.sock}: {e}") from e
                await asyncio.sleep(0.05)

    async def execute(self, cmd: str, args: dict | None = None, timeout_s: float = 10.0) -> Any:
        self.check_alive()
        return await asyncio.wait_for(self.qmp.execute(cmd, args), timeout_s)

    async def close(self) -> None:
        """`quit` (QEMU then flushes its trace log), else SIGKILL; always reaped."""
        if self.qmp is not None:
            with suppress(Exception):
                if self.proc.poll() is None:
                    await asyncio.wait_for(self.qmp.execute("quit"), 5)
            with suppress(Exception):
                await asyncio.wait_for(self.qmp.disconnect(), 5)
        deadline = time.monotonic() + 10
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        _kill(self.proc)


class _Recorder:
    """`uffdtrace record --mode full -p PID -o rec.csv --ioctls ioctls.csv --json`."""

    def __init__(self, pid: int, workdir: Path, mode: str) -> None:
        self.csv, self.ioctls = workdir / "rec.csv", workdir / "ioctls.csv"
        self.summary_path, self.stderr_path = workdir / "record.json", workdir / "record.stderr"
        argv = [sys.executable, "-m", "uffdtrace", "record", "--mode", mode, "-p", str(pid),
                "-o", str(self.csv), "--json"]
        if mode == "full":
            argv += ["--ioctls", str(self.ioctls)]
        self.lines: list[str] = []
        self.ready = threading.Event()
        with self.summary_path.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.PIPE, text=True, cwd=PROJECT,
                                         start_new_session=True,
                                         preexec_fn=_die_with_parent(signal.SIGTERM))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("uffdtrace: tracing "):
                self.ready.set()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    async def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready.is_set():
            if self.proc.poll() is not None:
                raise MigrationError(f"record exited {self.proc.returncode} before tracing:\n"
                                     f"{self.stderr}")
            if time.monotonic() > deadline:
                raise MigrationError(f"record not tracing after {timeout_s} s:\n{self.stderr}")
            await asyncio.sleep(0.05)

    async def stop(self, timeout_s: float) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        timed_out = self.proc.poll() is None
        _kill(self.proc)
        self.reader.join(10)
        self.stderr_path.write_text(self.stderr)
        if timed_out:
            raise MigrationError(f"record did not stop within {timeout_s} s after SIGINT:\n"
                                 f"{self.stderr}")
        return self.proc.returncode

    def kill(self) -> None:
        _kill(self.proc)
        self.reader.join(10)


def qemu_argv(qemu: str, name: str, guest: Guest, config: Config, workdir: Path) -> list[str]:
    argv = [qemu, "-name", f"{name},debug-threads=on", "-accel", "tcg", "-smp", str(config.smp),
            "-m", str(config.mem_mib), "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", f"file:{workdir / (name + '.console')}", "-no-reboot",
            "-kernel", str(guest.vmlinux), "-initrd", str(guest.initrd),
            "-append", f"console=ttyS0 quiet panic=-1 uffdguest.pages={config.pages}"]
    if config.memory == "memfd":
        argv += ["-object", f"memory-backend-memfd,id=mem,size={config.mem_mib}M,share=on",
                 "-machine", "memory-backend=mem"]
    elif config.memory != "anon":
        raise ValueError(f"memory: anon or memfd, not {config.memory!r}")
    return argv


async def _wait_for(what: str, check: Callable[[], Any], timeout_s: float,
                    alive: Callable[[], None], interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        alive()
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise MigrationError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


def _rounds(console: Path) -> int:
    """Rounds of the guest's reader loop printed on this console so far."""
    with suppress(OSError):
        return console.read_text(errors="replace").count("uffdguest: round ")
    return 0


def _guest_ready(console: Path) -> bool:
    """Both loops have run: the reader READY_ROUNDS rounds, the writer one."""
    with suppress(OSError):
        text = console.read_text(errors="replace")
        return text.count("uffdguest: round ") >= READY_ROUNDS and "uffdguest: dirty " in text
    return False


async def _migrate(qemu: str, guest: Guest, config: Config, result: Result) -> None:
    workdir = result.workdir
    t = result.times
    caps = [{"capability": c, "state": True} for c in
            ("postcopy-ram", "postcopy-blocktime", "events", *config.extra_caps)]
    events_file = workdir / "dst.events"
    events_file.write_text("\n".join(TRACE_EVENTS) + "\n")
    src = dst = None
    recorder = None
    sockdir = Path(tempfile.mkdtemp(prefix="uffdq-"))
    try:
        t["start"] = time.monotonic()
        dst = _Qemu("dst", [*qemu_argv(qemu, "dst", guest, config, workdir), "-incoming", "defer",
                            "-trace", f"events={events_file}", "-D", str(workdir / "dst.trace"),
                            "-msg", "timestamp=on"], workdir, sockdir)
        src = _Qemu("src", qemu_argv(qemu, "src", guest, config, workdir), workdir, sockdir)
        result.src_pid, result.dst_pid = src.proc.pid, dst.proc.pid

        def alive() -> None:
            src.check_alive()
            dst.check_alive()
            result.dst_threads.update(thread_names(dst.proc.pid))

        await dst.connect()
        await src.connect()
        for side in (src, dst):
            await side.execute("migrate-set-capabilities", {"capabilities": caps})
        await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = None
        for addr in (await dst.execute("query-migrate")).get("socket-address", []):
            if addr.get("type") == "inet":
                port = int(addr["port"])
        if not port:
            raise MigrationError("the destination reports no listening port")
        t["dst_listening"] = time.monotonic()

        if config.record:
            recorder = _Recorder(dst.proc.pid, workdir, config.record_mode)
            await recorder.wait_ready(config.record_ready_timeout_s)
            t["record_ready"] = time.monotonic()
        console = workdir / "src.console"
        await _wait_for(f"the guest's loops to run (in {console})",
                        lambda: _guest_ready(console), config.boot_timeout_s, alive)
        t["guest_ready"] = time.monotonic()

        await src.execute("migrate-set-parameters", {
            "max-bandwidth": config.precopy_bandwidth,
            "max-postcopy-bandwidth": config.postcopy_bandwidth})
        result.clock_offsets_ns.append(realtime_minus_monotonic_ns())
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        t["migrate"] = time.monotonic()
        await asyncio.sleep(config.postcopy_after_s)
        status = (await src.execute("query-migrate")).get("status")
        if status != "active":
            raise MigrationError(f"source status {status!r} before post-copy (expected active)")
        await src.execute("migrate-start-postcopy")
        t["start_postcopy"] = time.monotonic()

        final: dict[str, str] = {}

        async def poll() -> bool:
            alive()
            for name, side in (("src", src), ("dst", dst)):
                if final.get(name) != "completed":
                    info = await side.execute("query-migrate")
                    final[name] = info.get("status", "")
                    if final[name] == "completed":
                        t[f"{name}_completed"] = time.monotonic()
                    elif final[name] in ("failed", "cancelled"):
                        raise MigrationError(f"{name} migration {final[name]}: {info}")
            return final.get("src") == final.get("dst") == "completed"

        deadline = time.monotonic() + config.migration_timeout_s
        while not await poll():
            if time.monotonic() > deadline:
                raise MigrationError(f"not completed after {config.migration_timeout_s} s: {final}")
            await asyncio.sleep(0.05)
        result.dst_info = await dst.execute("query-migrate")
        result.src_info = await src.execute("query-migrate")
        result.clock_offsets_ns.append(realtime_minus_monotonic_ns())
        # the guest runs on after the switch-over: its reader loop prints on the destination
        dst_console = workdir / "dst.console"
        await _wait_for(f"the guest to run on in the destination (in {dst_console})",
                        lambda: _rounds(dst_console) >= 1, config.boot_timeout_s, alive)
        t["guest_runs_on"] = time.monotonic()

        if recorder is not None:
            rc = await recorder.stop(config.record_stop_timeout_s)
            result.record_stderr = recorder.stderr
            if rc != 0:
                raise MigrationError(f"record exited {rc}:\n{recorder.stderr}")
            t["record_stopped"] = time.monotonic()
    finally:
        if recorder is not None:
            recorder.kill()
            result.record_stderr = recorder.stderr
        for side in (dst, src):  # the destination first: it flushes its trace log on quit
            if side is not None:
                try:
                    await side.close()
                finally:
                    _kill(side.proc)
                t[f"{side.name}_closed"] = time.monotonic()
        shutil.rmtree(sockdir, ignore_errors=True)


def run_postcopy(workdir: Path, config: Config | None = None, guest: Guest | None = None) -> Result:
    """One traced post-copy migration in `workdir` (which receives the consoles, the trace log,
    the recorder's CSVs and summary). Raises MigrationError / QemuSetupMissing."""
    config = config or Config()
    qemu, kernel = check_tools()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if re.search(r"[,\s]", str(workdir)):
        raise MigrationError(f"{workdir}: no commas or spaces (they would split QEMU's options)")
    guest = guest or build_guest(workdir / "guest", kernel)
    result = Result(config, workdir)
    try:
        asyncio.run(asyncio.wait_for(_migrate(qemu, guest, config, result), _overall(config)))
    except TimeoutError as e:
        raise MigrationError(f"the whole run took more than {_overall(config)} s") from e
    finally:
        result.save()
    result = load(workdir)
    result.times["loaded"] = time.monotonic()
    return result


def _overall(config: Config) -> float:
    return (30 + config.boot_timeout_s + config.record_ready_timeout_s + config.postcopy_after_s
            + config.migration_timeout_s + config.record_stop_timeout_s)


# --- QEMU's trace log ------------------------------------------------------------------------

_TRACE_LINE = re.compile(r"^(\d+)@(\d+)\.(\d{6}):(\w+) ?(.*)$")
_HEX_FIELDS = {
    "postcopy_ram_fault_thread_request": re.compile(
        r"HVA=0x(?P<addr>[0-9a-f]+) rb=(?P<rb>\S+) offset=0x(?P<offset>[0-9a-f]+) pid=(?P<ptid>\d+)"),
    "postcopy_place_page": re.compile(r"host=0x(?P<addr>[0-9a-f]+)"),
    "postcopy_place_page_zero": re.compile(r"host=0x(?P<addr>[0-9a-f]+)"),
    "ram_load_postcopy_loop": re.compile(
        r"chan=\d+ addr=0x(?P<offset>[0-9a-f]+) flags=0x(?P<flags>[0-9a-f]+)"),
    "mark_postcopy_blocktime_begin": re.compile(
        r"addr: 0x(?P<addr>[0-9a-f]+), dd: \S+, time: (?P<ms>\d+), cpu: (?P<cpu>-?\d+), "
        r"already_received: (?P<already>\d+)"),
    "mark_postcopy_blocktime_end": re.compile(
        r"addr: 0x(?P<addr>[0-9a-f]+), dd: \S+, time: (?P<ms>\d+), affected_cpu: (?P<affected>\d+)"),
}
_DECIMAL = {"ptid", "ms", "cpu", "already", "affected"}


def parse_trace(path: Path) -> pd.DataFrame:
    """The trace log as rows: tid (QEMU's emitting thread), real_ns (CLOCK_REALTIME, µs
    resolution), event, and the parsed fields (addr, ptid, cpu, ...) where the event has them;
    other lines (error_report's, the log's own) are ignored."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        m = _TRACE_LINE.match(line)
        if not m:
            continue
        tid, sec, usec, event, rest = m.groups()
        rec: dict[str, Any] = {"tid": int(tid), "real_ns": int(sec) * 10**9 + int(usec) * 1000,
                               "event": event, "text": rest}
        pattern = _HEX_FIELDS.get(event)
        fm = pattern.search(rest) if pattern else None
        if fm:
            for k, v in fm.groupdict().items():
                rec[k] = int(v) if k in _DECIMAL else v if k == "rb" else int(v, 16)
        records.append(rec)
    columns = ["tid", "real_ns", "event", "text", "addr", "rb", "offset", "ptid", "flags", "ms",
               "cpu", "already", "affected"]
    return pd.DataFrame.from_records(records, columns=columns)


# --- QEMU's numbers against ours ----------------------------------------------------------------

PAGE = 4096
PLACED = {"postcopy_place_page": "COPY", "postcopy_place_page_zero": "ZEROPAGE"}
BACKING = {"anon": "anon", "memfd": "shmem"}
GOOD_OUTCOMES = {"resolved", "no_wait"}


def is_vcpu(comm: object) -> bool:
    return isinstance(comm, str) and comm.startswith("CPU ")


def _multiset_diff(theirs: Counter, ours: Counter, limit: int = 5) -> str:
    only_theirs, only_ours = theirs - ours, ours - theirs
    fmt = lambda c: [tuple(hex(v) if isinstance(v, int) and v > 1 << 32 else v for v in k)  # noqa: E731
                     for k in list(c.elements())[:limit]]
    return (f"{sum(only_theirs.values())} only in QEMU's (e.g. {fmt(only_theirs)}), "
            f"{sum(only_ours.values())} only in ours (e.g. {fmt(only_ours)})")


def _ms(ns: float) -> float:
    return round(float(ns) / 1e6, 1)


def qemu_blocktime_replay(trace: pd.DataFrame) -> dict[int, dict[str, float]]:
    """QEMU 7.2's per-vCPU blocktime bookkeeping replayed on its own trace events, in µs instead
    of ms: one slot per vCPU (address, begin) set by mark_postcopy_blocktime_begin (cleared if
    already_received) and closed by the mark_postcopy_blocktime_end of that address. A begin
    that finds its vCPU's slot still open overwrites it: that fault's time is never counted
    (`overwritten`, `overwritten_ms` = from the lost begin to the page's placement)."""
    ev = trace[trace["event"].isin(["mark_postcopy_blocktime_begin", "mark_postcopy_blocktime_end"])]
    ends = {}
    for addr, ns in zip(ev.loc[ev["event"] == "mark_postcopy_blocktime_end", "addr"],
                        ev.loc[ev["event"] == "mark_postcopy_blocktime_end", "real_ns"], strict=True):
        ends.setdefault(int(addr), int(ns))
    slots: dict[int, tuple[int, int]] = {}
    out: dict[int, dict[str, float]] = {}
    for event, addr, ns, cpu, already in zip(ev["event"], ev["addr"], ev["real_ns"], ev["cpu"],
                                             ev["already"], strict=True):
        if event == "mark_postcopy_blocktime_begin":
            c = int(cpu)
            o = out.setdefault(c, {"counted_ms": 0.0, "counted": 0, "overwritten": 0, "overwritten_ms": 0.0})
            if c in slots:
                lost_addr, lost_ns = slots.pop(c)
                o["overwritten"] += 1
                o["overwritten_ms"] += (ends.get(lost_addr, lost_ns) - lost_ns) / 1e6
            if not already:
                slots[c] = (int(addr), int(ns))
        else:
            for c, (a, begin) in list(slots.items()):
                if a == int(addr):
                    out[c]["counted_ms"] += (int(ns) - begin) / 1e6
                    out[c]["counted"] += 1
                    del slots[c]
    return {c: {k: round(v, 1) for k, v in o.items()} for c, o in sorted(out.items())}


def compare(r: Result) -> tuple[dict[str, Any], list[str]]:
    """(numbers, failures): QEMU's own account of the post-copy against the recording.

    Exact, as multisets:
    - placements: QEMU's `postcopy_place_page` (a UFFDIO_COPY that succeeded) and
      `postcopy_place_page_zero` (a UFFDIO_ZEROPAGE; 7.2 fails the migration if one fails),
      as (ioctl, page, QEMU's thread id), equal the ioctl CSV's COPY / ZEROPAGE rows with
      errno 0 as (ioctl, start, tid), each of one page;
    - fault messages: QEMU's `postcopy_ram_fault_thread_request` (one per uffd message its
      fault thread read, with the message's thread id) as (thread id, page) equal our fault
      rows that have a `msg_ns` (a message was read for them) as (tid, page). Our other rows
      are faults whose page was placed before any message of theirs was read: the kernel then
      takes the message back, so QEMU never saw them (counted, not compared).
    Per row: outcome resolved (or no_wait), kind missing, the memory's backing, page size 4096,
    errno 0, a COPY/ZEROPAGE resolver by a thread of the destination, which is the ioctl row
    of that page with the same thread and the same enter/exit instants, and which QEMU's trace
    says placed that page (same kind, same thread id). The ioctls' `woken` adds up to the
    resolved rows. No records lost; every message read was matched to a fault.
    Instants, on two clocks: QEMU's request line is printed after the read() whose return is
    our `msg_ns`, its `postcopy_place_page` line after the UFFDIO_COPY (our `exit_ns`), its
    `postcopy_place_page_zero` line before the UFFDIO_ZEROPAGE (our `enter_ns`): no line may be
    on the wrong side by more than 0.5 ms (+ the drift of REALTIME - MONOTONIC over the run).
    Blocktime, per vCPU: QEMU's `postcopy-vcpu-blocktime` may only be smaller than the sum of
    our `stall_ns` (to within 3 % + 20 ms): fault -> return contains QEMU's message read ->
    placement, and 7.2 drops the faults whose one slot per vCPU was overwritten
    (`qemu_blocktime_replay`). Reported beside it, not asserted: QEMU's own per-fault
    request -> placed sum from its trace and ours msg -> cont_exit for the same faults.
    """
    assert r.trace is not None and r.rows is not None and r.ioctls is not None
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)

    ev, dst = r.trace, r.dst_pid
    # the destination's threads: seen in /proc during the run, and named by our own rows
    io_dst = r.ioctls[r.ioctls["pid"] == dst]
    names = {**dict(zip(io_dst["tid"], io_dst["comm"], strict=True)),
             **dict(zip(r.rows.loc[r.rows["pid"] == dst, "tid"], r.rows.loc[r.rows["pid"] == dst, "comm"],
                        strict=True)),
             **r.dst_threads}
    n: dict[str, Any] = {"memory": r.config.memory, "smp": r.config.smp, "mem_mib": r.config.mem_mib}
    t = r.times
    n["steps_s"] = {k: round(v - t["start"], 2) for k, v in t.items()}
    first = lambda name: ev.loc[ev["event"] == name, "real_ns"].min()  # noqa: E731
    # from the destination's vCPUs starting to the uffd's cleanup
    postcopy_ns = first("postcopy_ram_incoming_cleanup_entry") - first("loadvm_postcopy_handle_run")
    n["postcopy_s"] = round(float(postcopy_ns) / 1e9, 3)
    n["clock_offset_drift_us"] = (r.clock_offsets_ns[-1] - r.clock_offsets_ns[0]) // 1000

    # placements
    placed = ev[ev["event"].isin(list(PLACED))]
    theirs_placed = Counter(zip(placed["event"].map(PLACED), placed["addr"].astype(int),
                                placed["tid"].astype(int), strict=True))
    io = io_dst
    fills = io[io["ioctl"].isin(["COPY", "ZEROPAGE"])]
    ok = fills[fills["errno"] == 0]
    ours_placed = Counter(zip(ok["ioctl"], ok["start"].astype(int), ok["tid"].astype(int), strict=True))
    n["qemu_placed"] = {k: int((placed["event"] == e).sum()) for e, k in PLACED.items()}
    n["ours_ok"] = {k: int((ok["ioctl"] == k).sum()) for k in PLACED.values()}
    n["ours_failed_fills"] = fills[fills["errno"] != 0].groupby(["ioctl", "errno"]).size().to_dict()
    n["qemu_received_in_postcopy"] = int(((ev["event"] == "ram_load_postcopy_loop")
                                          & (ev["flags"].fillna(0).astype(int) & 0x10 == 0)).sum())
    n["ioctls"] = {f"{a} errno={b}": int(c) for (a, b), c in io.groupby(["ioctl", "errno"]).size().items()}
    check(theirs_placed == ours_placed,
          f"placed pages (ioctl, page, thread): QEMU {n['qemu_placed']} vs ours {n['ours_ok']}: "
          + _multiset_diff(theirs_placed, ours_placed))
    check(bool((ok["len"] == PAGE).all()),
          f"COPY/ZEROPAGE rows not of one page: {ok['len'].value_counts().to_dict()}")

    # fault messages
    req = ev[ev["event"] == "postcopy_ram_fault_thread_request"]
    rows = r.rows
    page = (rows["addr"] // PAGE) * PAGE
    has_msg = rows["msg_ns"].notna()
    theirs_req = Counter(zip(req["ptid"].astype(int), req["addr"].astype(int), strict=True))
    ours_req = Counter(zip(rows.loc[has_msg, "tid"].astype(int), page[has_msg].astype(int), strict=True))
    vcpu = rows["comm"].map(is_vcpu)
    n["qemu_requests"] = len(req)
    name_of = lambda tid: names.get(int(tid), f"tid {tid}") if pd.notna(tid) else None  # noqa: E731
    n["qemu_requests_by_thread"] = req["ptid"].map(name_of).value_counts().to_dict()
    n["src_postcopy_requests"] = r.src_info.get("ram", {}).get("postcopy-requests")
    n["rows"] = len(rows)
    n["rows_vcpu"] = int(vcpu.sum())
    n["rows_other"] = rows.loc[~vcpu, "comm"].value_counts().to_dict()
    n["rows_with_msg"] = int(has_msg.sum())
    requested = set(ev.loc[ev["event"] == "postcopy_page_req_add", "addr"].dropna().astype(int))
    no_msg_pages = page[~has_msg].astype(int)
    n["rows_without_msg"] = int((~has_msg).sum())
    n["rows_without_msg_page_requested_by_qemu"] = int(no_msg_pages.isin(requested).sum())
    check(theirs_req == ours_req, f"fault messages (thread, page): QEMU {len(req)} vs ours "
          f"{int(has_msg.sum())} rows with a message: " + _multiset_diff(theirs_req, ours_req))
    check(len(req) > 0, "QEMU's fault thread read no fault message: the guest never faulted "
          "in post-copy, nothing was compared")
    check(bool((rows["pid"] == dst).all()), f"rows of other pids: {rows['pid'].value_counts().to_dict()}")

    # each row
    n["outcomes"] = rows["outcome"].value_counts().to_dict()
    n["resolvers"] = rows["resolver"].value_counts(dropna=False).to_dict()
    n["backing_kind"] = (rows["backing"].astype(str) + "/" + rows["kind"].astype(str)
                         ).value_counts().to_dict()
    n["handlers"] = rows["handler_tid"].map(name_of).value_counts(dropna=False).to_dict()
    backing = BACKING[r.config.memory]
    columns = ["fault_ns", "tid", "comm", "addr", "backing", "page_size", "kind", "outcome", "resolver",
               "errno", "mapped", "handler_pid", "handler_tid", "block_ns", "msg_ns", "wake_ns", "resume_ns",
               "return_ns"]
    for what, bad in (
            ("outcome not resolved/no_wait", ~rows["outcome"].isin(GOOD_OUTCOMES)),
            ("kind not missing", rows["kind"] != "missing"),
            (f"backing not {backing} or page_size not 4096",
             (rows["backing"] != backing) | (rows["page_size"] != PAGE)),
            ("errno not 0", rows["errno"] != 0),
            ("resolver not COPY/ZEROPAGE mapping 4096",
             ~rows["resolver"].isin(["COPY", "ZEROPAGE"]) | (rows["mapped"] != PAGE)),
            ("handler not a thread of the destination",
             (rows["handler_pid"] != dst) | ~rows["handler_tid"].isin(list(names)))):
        n.setdefault("bad_rows", {})[what] = int(bad.sum())
        check(not bad.any(), f"{int(bad.sum())} of {len(rows)} rows with {what}: "
              f"{rows.loc[bad, columns].head(5).to_dict('records')}")
    as_resolver = {"tid": "handler_tid", "ioctl": "resolver", "start": "page", "enter_ns": "cont_enter_ns",
                   "exit_ns": "cont_exit_ns"}
    resolving = rows.assign(page=page).merge(
        ok.rename(columns=as_resolver)[list(as_resolver.values())],
        how="left", indicator=True, on=list(as_resolver.values()))
    unmatched = resolving[resolving["_merge"] != "both"]
    check(len(resolving) == len(rows) and unmatched.empty,
          f"{len(unmatched)} rows whose resolver is not a successful ioctl row of their page by their "
          f"handler at their cont_enter/exit instants: {unmatched.head(5).to_dict('records')}")
    placer = {int(a): (PLACED[e], int(tid))
              for e, a, tid in zip(placed["event"], placed["addr"], placed["tid"], strict=True)}
    by_qemu = [placer.get(int(p)) == (res, int(h)) if pd.notna(h) else False
               for p, res, h in zip(page, rows["resolver"], rows["handler_tid"], strict=True)]
    check(all(by_qemu), f"{by_qemu.count(False)} rows whose page QEMU's trace says another thread or "
          f"another ioctl placed")
    resolved = int((rows["outcome"] == "resolved").sum())
    n["woken_by_fills"] = int(ok["woken"].sum())
    check(n["woken_by_fills"] == resolved,
          f"faults woken by COPY/ZEROPAGE (ioctl CSV) {n['woken_by_fills']} != resolved rows {resolved}")
    s = r.summary
    n["lost_total"], n["messages_unmatched"] = s.get("lost_total"), s.get("messages_unmatched")
    check(s.get("lost_total") == 0, f"lost records: {s.get('lost')}")
    check(s.get("messages_unmatched") == 0, f"{s.get('messages_unmatched')} messages matched no fault")

    # instants: each of QEMU's trace lines comes after (request, COPY) or before (ZEROPAGE) the
    # syscall we timed, on another clock (gettimeofday): CLOCK_REALTIME - CLOCK_MONOTONIC is
    # measured before and after the migration, and a line may not be earlier than our instant
    # by more than `tol` (or later, for ZEROPAGE)
    off, drift = r.clock_offset_ns, abs(r.clock_offsets_ns[-1] - r.clock_offsets_ns[0])
    tol = 500_000 + drift
    req_mono = req.assign(page=req["addr"].astype(int), tid=req["ptid"].astype(int))
    req_mono["nth"] = req_mono.groupby(["tid", "page"]).cumcount()
    mine = rows[has_msg].assign(page=page[has_msg].astype(int)).sort_values("msg_ns")
    mine["nth"] = mine.groupby(["tid", "page"]).cumcount()
    pairs = mine.merge(req_mono[["tid", "page", "nth", "real_ns"]], on=["tid", "page", "nth"])
    placed_at = dict(zip(placed["addr"].astype(int), placed["real_ns"], strict=True))
    pairs["placed_real_ns"] = pairs["page"].map(placed_at)
    lag = {"request_after_msg": (pairs["real_ns"] - off - pairs["msg_ns"]) / 1e3}
    fills_at = ok.assign(real_ns=[placed_at.get(int(a)) for a in ok["start"]]).dropna(subset=["real_ns"])
    copies, zeros = fills_at[fills_at["ioctl"] == "COPY"], fills_at[fills_at["ioctl"] == "ZEROPAGE"]
    lag["copy_line_after_exit"] = (copies["real_ns"] - off - copies["exit_ns"]) / 1e3
    lag["zero_line_before_enter"] = (zeros["enter_ns"] - (zeros["real_ns"] - off)) / 1e3
    n["clock_tolerance_us"] = tol // 1000
    n["lag_us"] = {k: {q: round(float(x), 1) for q, x in v.quantile([0, 0.5, 0.99, 1]).items()}
                   for k, v in lag.items() if len(v)}
    for k, v in lag.items():
        early = v[v < -tol / 1e3]
        check(early.empty, f"{k}: {len(early)} of {len(v)} QEMU trace lines on the wrong side of our "
              f"instant by more than {tol / 1e3:.0f} µs (worst {v.min():.0f} µs)")

    # blocktime per vCPU
    reported = r.dst_info.get("postcopy-vcpu-blocktime") or []
    n["qemu_postcopy_blocktime_ms"] = r.dst_info.get("postcopy-blocktime")
    replay = qemu_blocktime_replay(ev)
    cpu_of = {name: int(m.group(1)) for name in set(rows.loc[vcpu, "comm"]) | set(names.values())
              if (m := re.match(r"CPU (\d+)/", str(name)))}
    per_vcpu = {}
    for comm, cpu in sorted(cpu_of.items(), key=lambda kv: kv[1]):
        mine_c = rows[rows["comm"] == comm]
        pairs_c = pairs[pairs["comm"] == comm]
        v = {"qemu_reported_ms": reported[cpu] if cpu < len(reported) else None,
             "qemu_replay": replay.get(cpu, {}),
             "qemu_trace_request_to_placed_ms":
                 _ms((pairs_c["placed_real_ns"] - pairs_c["real_ns"]).sum()),
             "ours_msg_to_cont_exit_ms": _ms((pairs_c["cont_exit_ns"] - pairs_c["msg_ns"]).sum()),
             "ours_stall_ms": _ms(mine_c["stall_ns"].sum()),
             "faults": len(mine_c)}
        per_vcpu[comm] = v
        q = v["qemu_reported_ms"]
        check(q is not None and v["ours_stall_ms"] >= q - (0.03 * q + 20),
              f"{comm}: our stall sum {v['ours_stall_ms']} ms < QEMU's postcopy-vcpu-blocktime {q} ms")
    n["per_vcpu"] = per_vcpu
    check(len(per_vcpu) == r.config.smp, f"vCPU threads {sorted(cpu_of)}, expected {r.config.smp}")
    # QEMU's definition (message read -> page placed) as the qemu plugin computes it from our
    # rows, against the same sum recomputed from QEMU's own trace lines (request -> placed)
    plugin = qemu_plugin_tables(r)["vcpus"].set_index("vcpu")
    for comm, cpu in cpu_of.items():
        theirs = per_vcpu[comm]["qemu_trace_request_to_placed_ms"]
        ours = _ms(plugin["qemu_ns"].get(cpu, 0))
        per_vcpu[comm]["plugin_qemu_ms"], per_vcpu[comm]["plugin_stall_ms"] = ours, _ms(
            plugin["stall_ns"].get(cpu, 0))
        check(abs(ours - theirs) <= 0.02 * theirs,
              f"{comm}: the qemu plugin's QEMU-definition blocktime {ours} ms is not within 2 % of "
              f"QEMU's trace (request -> placed) {theirs} ms")
    check_vcpu_column(rows, check)
    return n, failures


def qemu_plugin_tables(r: Result) -> dict[str, pd.DataFrame]:
    """The qemu plugin's tables over the recording (read as `uffdtrace report` reads it)."""
    plugin = QemuPlugin()
    plugin.start(RunContext(targets=("qemu",), backend="file", mode=r.config.record_mode, live=False))
    for chunk in read_faults(r.workdir / "rec.csv"):
        plugin.batch(chunk)
    return plugin.finish()


def check_vcpu_column(rows: pd.DataFrame, check: Callable[[bool, str], None]) -> None:
    """`vcpu` is the index in a vCPU thread's name (`CPU n/TCG`), empty for other threads."""
    named = rows["comm"].str.extract(r"^CPU (\d+)/TCG$", expand=False).astype(float)
    wrong = ~((rows["vcpu"] == named) | (rows["vcpu"].isna() & named.isna()))
    check(not wrong.any(), f"{int(wrong.sum())} rows whose vcpu does not match their thread name: "
          f"{rows.loc[wrong, ['tid', 'comm', 'vcpu']].head(5).to_dict('records')}")


def compare_light(r: Result) -> tuple[dict[str, Any], list[str]]:
    """(numbers, failures) of a light-mode recording (no ioctls): every fault
    message QEMU's fault thread read has its fault row (thread, page); each row has the
    memory's backing, kind missing and its vCPU; nothing lost; each vCPU's stall sum is at
    least QEMU's postcopy-vcpu-blocktime (to within 3 % + 20 ms, as in full mode)."""
    assert r.trace is not None and r.rows is not None
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)

    rows, ev = r.rows, r.trace
    req = ev[ev["event"] == "postcopy_ram_fault_thread_request"]
    theirs = Counter(zip(req["ptid"].astype(int), req["addr"].astype(int), strict=True))
    ours = Counter(zip(rows["tid"].astype(int), ((rows["addr"] // PAGE) * PAGE).astype(int), strict=True))
    n: dict[str, Any] = {"memory": r.config.memory, "mode": "light", "rows": len(rows),
                         "qemu_requests": len(req), "lost_total": r.summary.get("lost_total")}
    check(len(req) > 0, "QEMU's fault thread read no fault message: nothing was compared")
    check(not theirs - ours, "fault messages QEMU read without a row (thread, page): "
          + _multiset_diff(theirs, ours))
    backing = BACKING[r.config.memory]
    bad = (rows["backing"] != backing) | (rows["kind"] != "missing") | (rows["pid"] != r.dst_pid)
    check(not bad.any(), f"{int(bad.sum())} rows not of the destination, {backing}, missing: "
          f"{rows.loc[bad, ['tid', 'comm', 'backing', 'kind']].head(5).to_dict('records')}")
    check(r.summary.get("lost_total") == 0, f"lost records: {r.summary.get('lost')}")
    reported = r.dst_info.get("postcopy-vcpu-blocktime") or []
    stall = qemu_plugin_tables(r)["vcpus"].set_index("vcpu")["stall_ns"]
    n["per_vcpu"] = {cpu: {"qemu_reported_ms": q, "ours_stall_ms": _ms(stall.get(cpu, 0))}
                     for cpu, q in enumerate(reported)}
    for cpu, v in n["per_vcpu"].items():
        q = v["qemu_reported_ms"]
        check(v["ours_stall_ms"] >= q - (0.03 * q + 20),
              f"vCPU {cpu}: our stall sum {v['ours_stall_ms']} ms < QEMU's {q} ms")
    check(len(reported) == r.config.smp, f"QEMU reported {len(reported)} vCPUs' blocktime")
    check_vcpu_column(rows, check)
    return n, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.qemu_postcopy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--memory", choices=["anon", "memfd"], default="anon")
    parser.add_argument("--smp", type=int, default=Config.smp)
    parser.add_argument("--mem", type=int, default=Config.mem_mib, help="guest MiB")
    parser.add_argument("--postcopy-mib-s", type=int, default=Config.postcopy_bandwidth >> 20)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--mode", choices=["full", "light"], default="full", help="record's mode")
    parser.add_argument("--load", action="store_true", help="compare the run already in --out")
    parser.add_argument("--pages", type=int, default=Config.pages, help="awk's strings")
    parser.add_argument("--cap", action="append", default=[], help="another migration capability")
    parser.add_argument("--after", type=float, default=Config.postcopy_after_s,
                        help="start post-copy after S s")
    parser.add_argument("--precopy-mib-s", type=int, default=Config.precopy_bandwidth >> 20)
    args = parser.parse_args(argv)
    config = Config(memory=args.memory, smp=args.smp, mem_mib=args.mem,
                    postcopy_bandwidth=args.postcopy_mib_s << 20, record=not args.no_record, pages=args.pages,
                    extra_caps=tuple(args.cap), postcopy_after_s=args.after,
                    precopy_bandwidth=args.precopy_mib_s << 20, record_mode=args.mode)
    result = run_postcopy(args.out, config) if not args.load else load(args.out)
    if not config.record and not args.load:
        print(json.dumps({"qemu_requests": len(result.events("postcopy_ram_fault_thread_request")),
                          "dst": result.dst_info, "times": result.times}, indent=1, default=str))
        return 0
    nums, failures = (compare if config.record_mode == "full" else compare_light)(result)
    print(json.dumps(nums, indent=1, default=str))
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
