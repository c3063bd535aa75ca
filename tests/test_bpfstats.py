"""The tracer's own cost (issue #16): BPF run-time stats are held on by an fd of the session's,
never by the kernel.bpf_stats_enabled sysctl, so a killed session leaves them as they were and
overlapping sessions don't switch each other's off."""

from __future__ import annotations

import mmap
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from uffdtrace.probes.bpfstats import BpfStats
from uffdtrace.probes.tracepoint import TraceScope
from uffdtrace.session import Session

pytestmark = [pytest.mark.root]

STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


@pytest.fixture
def sysctl_off() -> Iterator[None]:
    """The sysctl at 0 for the test (a 1 left behind would hide a write to it), then as it was."""
    before = STATS_SYSCTL.read_text()
    STATS_SYSCTL.write_text("0")
    yield
    STATS_SYSCTL.write_text(before)


def sysctl() -> str:
    return STATS_SYSCTL.read_text().strip()


def run_ns_after_faults(session: Session) -> int:
    """The session's BPF run time after page faults of this process, which its programs see."""
    with mmap.mmap(-1, 256 << 12) as fresh:
        fresh[::4096] = b"x" * 256
    return session.backend.run_stats()[0]


def test_session_counts_run_time_without_the_sysctl(sysctl_off):
    session = Session("light", TraceScope(), [])
    try:
        session.start()
        first = run_ns_after_faults(session)
        assert run_ns_after_faults(session) > first > 0
        assert sysctl() == "0"
    finally:
        session.close()
    assert sysctl() == "0"


def test_an_overlapping_session_ending_first_leaves_stats_on(sysctl_off):
    other = BpfStats()
    session = Session("light", TraceScope(), [])
    try:
        assert other.enable()
        session.start()
        other.restore()
        first = run_ns_after_faults(session)
        assert run_ns_after_faults(session) > first
    finally:
        other.restore()
        session.close()


def test_a_killed_holder_leaves_the_sysctl_as_it_was(sysctl_off):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from uffdtrace.probes.bpfstats import BpfStats; "
         "stats = BpfStats(); print(stats.enable(), flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
    finally:
        holder.kill()
        holder.wait()
    assert sysctl() == "0"
