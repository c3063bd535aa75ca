"""A failed write (issue #16): a full disk under `record -o`, a closed pipe on stdout
(`record -- COMMAND | head -n 3`). The tracer stops tracing with one line naming the failure,
detaches BPF, leaves a CSV that ends at its last complete row, still prints the summary, lets
the traced command run to its end untraced, waits for it, and exits 1. Afterwards nothing of
the run is left: no process of it, no BPF program it held, BPF stats, hugepages and network
namespaces as before (conftest.MachineState, as in tests/test_fault_injection.py)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MachineState, reaped, report_accepts, tracing_started, whole_rows

pytestmark = [pytest.mark.root, pytest.mark.netns]

UFFDTRACE = [sys.executable, "-m", "uffdtrace"]
PAGES = 50_000  # ~12 MB of CSV, and a few seconds of faults


@pytest.fixture
def small_fs(tmp_path) -> Iterator[Path]:
    """A 6 MiB tmpfs (more than one batch of rows: the session feeds its sinks every 0.25 s),
    unmounted afterwards even when the test fails."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def record(tmp: Path, *args: str) -> subprocess.Popen:
    """`record ARGS -- exerciser`; the exerciser's own summary (ground truth) goes to tmp/gt.json.
    The run is a process group of its own (the tracer's pid)."""
    exercise = shlex.join([*UFFDTRACE, "exercise", "--pages", str(PAGES), "--json"])
    return subprocess.Popen([*UFFDTRACE, "record", *args, "--", "sh", "-c",
                             f"{exercise} > {tmp / 'gt.json'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def check_stderr(err: str, failure: str) -> int:
    """One line names the failure, no traceback, and the summary follows: its fault count."""
    assert [line for line in err.splitlines() if "fail" in line or "uffdtrace: writing" in line] \
        == [failure], err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert "tracer cost:" in err, err
    return int(re.search(r"^(\d+) faults \(", err, re.M).group(1))


def ran_to_its_end(tmp: Path) -> None:
    """The traced command was neither killed nor cut short, and uffdtrace waited for it."""
    assert json.loads((tmp / "gt.json").read_text())["faults"] == PAGES


def test_a_full_disk_stops_tracing_and_leaves_whole_rows(tmp_path, small_fs):
    state = MachineState.now()
    out = small_fs / "f.csv"
    tracer = record(tmp_path, "-o", str(out))
    with reaped(tracer):
        early, held = tracing_started(tracer)
        stdout, err = tracer.communicate(timeout=180)
    err = early + err
    assert tracer.returncode == 1, err
    faults = check_stderr(err, f"uffdtrace: writing {out} failed: No space left on device; "
                               "stopped tracing")
    assert "Traceback" not in stdout
    rows = whole_rows(out.read_text())
    assert 0 < len(rows) == faults < PAGES  # the summary counts the rows written
    report_accepts(out)
    ran_to_its_end(tmp_path)
    state.check_restored(bpf_programs=held, pgids=[tracer.pid])


def test_a_closed_pipe_stops_tracing(tmp_path):
    """As `uffdtrace record -- COMMAND | head -n 3`."""
    state = MachineState.now()
    tracer = record(tmp_path)
    with reaped(tracer):
        early, held = tracing_started(tracer)
        head = "".join(tracer.stdout.readline() for _ in range(3))
        tracer.stdout.close()
        tracer.stdout = None  # communicate() reads stderr only
        _, err = tracer.communicate(timeout=180)
    err = early + err
    assert tracer.returncode == 1, err
    check_stderr(err, "uffdtrace: writing <stdout> failed: Broken pipe; stopped tracing")
    assert len(whole_rows(head)) == 2
    (tmp_path / "head.csv").write_text(head)
    report_accepts(tmp_path / "head.csv")
    ran_to_its_end(tmp_path)
    state.check_restored(bpf_programs=held, pgids=[tracer.pid])
