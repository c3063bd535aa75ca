"""A real QEMU post-copy live migration, traced: QEMU as a foreign workload (issue #12, req. 3).

Debian's QEMU 7.2 migrates a TCG guest (Debian's 6.1 kernel, a busybox initramfs that keeps
writing tmpfs files and reading ~40 MiB of awk strings at random, 2 vCPUs) from one process to
another on 127.0.0.1, post-copy: `migrate`, then `migrate-start-postcopy` 1.2 s later, the
post-copy stream limited to 32 MiB/s (2-4 s of post-copy). `uffdtrace record` traces the
destination from before `migrate` until both sides report `completed`. QEMU's own account,
from its trace events and `query-migrate`, is held against the recording: see
`tests.qemu_postcopy.compare` (full mode) and `compare_light` for every check and why each is
exact or bounded.

One migration per memory type and tracer mode: QEMU's default anonymous RAM (MISSING faults,
UFFDIO_COPY and UFFDIO_ZEROPAGE), and a shared memfd backend (`memory-backend-memfd,share=on`: QEMU 7.2
registers shmem MISSING too, and resolves with COPY/ZEROPAGE; it never uses minor faults or
CONTINUE). About 15 s each here. Fails (never skips) when QEMU, Debian's 6.1 kernel,
busybox-static or the `qemu.qmp` package is missing, naming what to install.

By hand, keeping everything: `python -m tests.qemu_postcopy --out DIR [--memory memfd]
[--mode light]`.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.qemu_postcopy import (
    Config,
    Guest,
    build_guest,
    check_tools,
    compare,
    compare_light,
    run_postcopy,
)
from uffdtrace.errors import UserError
from uffdtrace.qmp import vcpu_threads
from uffdtrace.targets import alive

pytestmark = [pytest.mark.qemu]

_guests: dict[Path, Guest] = {}


@pytest.fixture(scope="module")
def guest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qemu-guest")


def guest_in(directory: Path) -> Guest:
    """The guest (vmlinux + initramfs), built once per module. check_tools() runs in the test,
    so that a missing package is a test failure."""
    _, kernel = check_tools()
    if directory not in _guests:
        _guests[directory] = build_guest(directory, kernel)
    return _guests[directory]


@pytest.mark.parametrize("mode", ["full", "light"])
@pytest.mark.parametrize("memory", ["anon", "memfd"])
@pytest.mark.root
def test_qemu_postcopy(tmp_path, guest_dir, no_leaks, memory, mode):
    """Full mode, exact: QEMU's placed pages = our successful COPY/ZEROPAGE ioctl rows (as
    page, ioctl and thread); the fault messages QEMU's fault thread read = our rows with a
    message (as thread and page); every row resolved by the COPY/ZEROPAGE row of its page,
    issued by the thread QEMU's trace names; kind missing, backing anon/shmem, errno 0; nothing
    lost. Bounded: QEMU's trace lines and our instants on the right sides of each other (two
    clocks, 0.5 ms); QEMU's per-vCPU blocktime not above our stall sums; the qemu plugin's
    per-vCPU blocktime in QEMU's definition within 2 % of QEMU's trace. Light mode: every
    message QEMU read has its row, backing and kind right, nothing lost, stall sums. Both: the
    guest runs on in the destination after the switch-over (run_postcopy waits for its loop's
    output there), the `vcpu` column; no QEMU left behind."""
    result = run_postcopy(tmp_path / "run", Config(memory=memory, record_mode=mode),
                          guest_in(guest_dir))
    for pid in (result.src_pid, result.dst_pid):
        assert not alive(pid), f"QEMU {pid} left running"
    numbers, failures = (compare if mode == "full" else compare_light)(result)
    text = json.dumps(numbers, default=str)
    (tmp_path / "numbers.json").write_text(text)
    print("qemu:", text)
    assert not failures, "\n".join([*failures, f"(logs and CSVs in {tmp_path / 'run'})", text])


def test_qmp_names_the_vcpu_threads(tmp_path):
    """`--qmp`'s query of a real QEMU (paused, 3 TCG vCPUs): each thread id is one of QEMU's
    threads, and its name (debug-threads=on) carries the same vCPU index."""
    qemu, _ = check_tools()
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen([qemu, "-name", "t,debug-threads=on", "-accel", "tcg,thread=multi",
                             "-smp", "3", "-m", "64", "-S", "-display", "none", "-nodefaults",
                             "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "QEMU did not start"
            time.sleep(0.05)
        vcpus = vcpu_threads(sock)
        names = {tid: Path(f"/proc/{proc.pid}/task/{tid}/comm").read_text().strip() for tid in vcpus}
    finally:
        proc.kill()
        proc.wait()
    assert sorted(vcpus.values()) == [0, 1, 2]
    assert all(names[tid] == f"CPU {cpu}/TCG" for tid, cpu in vcpus.items()), names
    with pytest.raises(UserError, match=r"--qmp .*: cannot ask QEMU for its vCPUs"):
        vcpu_threads(sock)  # QEMU is gone
