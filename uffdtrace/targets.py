"""What to trace: existing processes, the handlers that hold their userfaultfds, or a command
started under the tracer."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable
from pathlib import Path

from uffdtrace.errors import UserError

UFFD_LINK = "anon_inode:[userfaultfd]"


def check_pids(pids: Iterable[int]) -> list[int]:
    out = []
    for pid in pids:
        if pid <= 0 or not Path(f"/proc/{pid}").is_dir():
            raise UserError(f"no process with pid {pid}")
        out.append(pid)
    return out


def alive(pid: int) -> bool:
    """Still running (a zombie has exited: its traced work is over)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def uffd_inodes(pid: int) -> set[int]:
    """Inodes of the userfaultfds a process holds (each uffd has its own anon inode)."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return inodes
    for fd in entries:
        try:
            if os.readlink(fd) == UFFD_LINK:
                inodes.add(fd.stat().st_ino)
        except OSError:
            continue
    return inodes


def uffd_holders(inodes: set[int]) -> set[int]:
    """Every process holding one of these userfaultfds (e.g. a handler that received it over
    a unix socket)."""
    if not inodes:
        return set()
    holders = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and uffd_inodes(int(proc.name)) & inodes:
            holders.add(int(proc.name))
    return holders


UFFD_VMFLAGS = {"um": "missing", "uw": "wp", "ui": "minor"}


def uffd_ranges(pid: int) -> list[dict]:
    """userfaultfd-registered mappings of a running process, from /proc/PID/smaps VmFlags
    (registrations made before tracing started are invisible to the ioctl probes)."""
    ranges = []
    start = end = 0
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    lo, hi = line.split(" ", 1)[0].split("-")
                    start, end = int(lo, 16), int(hi, 16)
                elif line.startswith("VmFlags:"):
                    modes = [m for flag, m in UFFD_VMFLAGS.items() if flag in line.split()[1:]]
                    if modes:
                        ranges.append({"pid": pid, "start": start, "len": end - start,
                                       "modes": modes})
    except OSError:
        pass
    return ranges


def _default_signals() -> None:
    """In the forked child, before it waits: SIGPIPE and SIGXFSZ back to their default, which
    Python ignores and exec would keep (`yes | head` would complain of a broken pipe), as
    subprocess's restore_signals does; and Python's own handlers (SIGINT's KeyboardInterrupt
    would unwind uffdtrace's code in this copy of it) to what exec would make them."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if callable(signal.getsignal(sig)):
            signal.signal(sig, signal.SIG_DFL)


class LaunchedCommand:
    """A command forked now but exec'd only after `release()`, so tracing sees its first fault;
    never, if uffdtrace dies before. It starts with the signal dispositions a shell would give
    it, not Python's."""

    def __init__(self, argv: list[str]) -> None:
        if not argv:
            raise UserError("no command given after --")
        read_fd, self._go = os.pipe()
        err_read, err_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # child
            _default_signals()
            os.close(self._go)
            os.close(err_read)
            os.set_inheritable(err_write, False)
            if os.read(read_fd, 1) != b"x":  # uffdtrace died before tracing began
                os._exit(1)
            try:
                os.execvp(argv[0], argv)
            except OSError as e:
                os.write(err_write, f"{argv[0]}: {e.strerror}".encode())
            os._exit(127)
        os.close(read_fd)
        os.close(err_write)
        self._err = err_read
        self.returncode: int | None = None

    def release(self) -> None:
        """Let the child exec; raise UserError if the exec failed. A child killed while it
        waited (a Ctrl-C reaches it too) has simply ended: poll() says how."""
        with contextlib.suppress(BrokenPipeError):
            os.write(self._go, b"x")
        os.close(self._go)
        msg = os.read(self._err, 512)
        os.close(self._err)
        if msg:
            self.wait()
            raise UserError(f"cannot run {msg.decode()}")

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def terminate(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
