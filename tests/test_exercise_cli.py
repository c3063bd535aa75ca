"""`uffdtrace exercise` as a user runs it, on the real kernel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import handler_processes

from uffdtrace.exerciser.hugepages import available_hugepages, nr_hugepages

pytestmark = [pytest.mark.usefixtures("no_leaks"), pytest.mark.root]

UFFDTRACE = [sys.executable, "-m", "uffdtrace"]


NOBODY = 65534  # uid and gid of nobody / nogroup


def uffdtrace(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI (as `user`, a uid = gid, if given)."""
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user else []
    return subprocess.run([*prefix, *UFFDTRACE, *args], capture_output=True, text=True,
                          timeout=60)


def wait_for_file(path: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and (text := path.read_text().strip()):
            return text
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


def test_json_and_csv(tmp_path):
    faults, ops = tmp_path / "faults.csv", tmp_path / "ops.csv"
    out = uffdtrace("exercise", "--pages", "300", "--threads", "2", "--write-fraction", "0.5",
                    "--json", "--csv", str(faults), "--ops-csv", str(ops))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["faults"] == 300 and summary["errors"] == 0 and summary["mismatches"] == 0
    assert summary["p50_ns"] <= summary["p99_ns"] <= summary["max_ns"]
    assert summary["rate_per_s"] > 0
    f = pd.read_csv(faults)
    assert list(f.columns) == ["tid", "thread", "addr", "page", "write", "start_ns", "end_ns",
                               "stall_ns", "msg_ns", "handler_tid", "flags", "ptid"]
    assert (f["ptid"] == f["tid"]).all()
    assert len(f) == 300 and sorted(f["page"]) == list(range(300))
    assert f["stall_ns"].median() == pytest.approx(summary["p50_ns"], abs=1)
    o = pd.read_csv(ops)
    assert list(o.columns) == ["handler_tid", "op", "role", "start_ns", "end_ns", "addr", "len",
                               "errno", "mapped"]
    assert len(o) == 300 and set(o["op"]) == {"continue"}


def test_human_summary_and_help():
    out = uffdtrace("exercise", "--pages", "200", "--misuse", "copy-on-minor")
    assert out.returncode == 0, out.stderr
    for text in ("200 of 200 touches", "faults/s", "p50", "p99", "µs", "errors: EEXIST 200",
                 "failed with EEXIST", "verified  200 pages: all hold the expected bytes"):
        assert text in out.stdout, (text, out.stdout)
    helped = uffdtrace("exercise", "--help")
    assert helped.returncode == 0 and "examples:" in helped.stdout
    assert "--pid-file" in helped.stdout and "--misuse" in helped.stdout
    for option in ("--no-thread-id", "--continue-twice", "--reuse-fd", "{shmem,hugetlb,anon}",
                   "UFFD_FEATURE_THREAD_ID", "EEXIST", "same fd number", "kind missing only"):
        assert option in helped.stdout, option


def test_pid_file_and_delay_let_a_tracer_attach(tmp_path):
    pid_file = tmp_path / "pid"
    proc = subprocess.Popen(
        [*UFFDTRACE, "exercise", "--pages", "100", "--delay-s", "1", "--pid-file",
         str(pid_file), "--json"], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(wait_for_file(pid_file))
        assert pid == proc.pid
        # During the delay the uffd exists and the mapping is registered for minor faults.
        fds = []
        deadline = time.monotonic() + 5
        while "anon_inode:[userfaultfd]" not in fds and time.monotonic() < deadline:
            fds = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
            time.sleep(0.02)
        assert "anon_inode:[userfaultfd]" in fds
        assert any(line.startswith("VmFlags:") and " ui" in line
                   for line in Path(f"/proc/{pid}/smaps").read_text().splitlines())
        assert proc.poll() is None, "did not wait"
    finally:
        stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert json.loads(stdout)["faults"] == 100


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.hugepages
def test_signal_cleans_up(tmp_path, sig, status):
    """Interrupted during a hugetlb run with a handler process: hugepages given back, the
    handler process gone, no traceback."""
    pid_file = tmp_path / "pid"
    before = nr_hugepages()
    proc = subprocess.Popen(
        [*UFFDTRACE, "exercise", "--backing", "hugetlb", "--pages",
         str(available_hugepages() + 4), "--handler", "process", "--delay-s", "30",
         "--pid-file", str(pid_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = int(wait_for_file(pid_file))
    deadline = time.monotonic() + 20
    while not handler_processes(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert handler_processes(pid), "handler process never started"
    assert nr_hugepages() == before + 4
    time.sleep(0.1)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == status, stderr
    assert "Traceback" not in stderr
    assert nr_hugepages() == before
    assert not handler_processes(pid)


@pytest.mark.hugepages
def test_hugepages_of_a_sigkilled_run_are_given_back_by_the_next():
    """SIGKILL leaves no chance to shrink the pool: the next hugetlb run returns those pages."""
    before = nr_hugepages()
    killed = subprocess.Popen(
        [*UFFDTRACE, "exercise", "--backing", "hugetlb", "--pages",
         str(available_hugepages() + 4), "--delay-s", "30"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while nr_hugepages() == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert nr_hugepages() == before + 4
    killed.kill()
    killed.wait()
    assert nr_hugepages() == before + 4
    out = uffdtrace("exercise", "--backing", "hugetlb", "--pages", "2")
    assert out.returncode == 0, out.stderr
    assert nr_hugepages() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "fastest"], "unknown policy 'fastest'"),
        (["--backing", "tmpfs"], "unknown backing 'tmpfs'"),
        (["--pages", "0"], "pages must be an integer"),
        (["--pages", "many"], "invalid int value"),
        (["--pages", "100000000"], "beyond the memory available"),
        (["--backing", "hugetlb", "--pages", "1000000"], "MiB is available"),
        (["--cpus", "4096"], "CPU 4096 is not available"),
        (["--cpus", "zero"], "--cpus takes CPU ids"),
        (["--kind", "minor", "--misuse", "continue-on-missing"], "needs kind missing"),
        (["--misuse", "copy-everything"], "unknown misuse"),
        (["--write-fraction", "2"], "write fraction must be between 0 and 1"),
        (["--csv", "/nonexistent/dir/faults.csv"], "cannot write /nonexistent/dir/faults.csv"),
        (["--backing", "anon", "--kind", "minor"], "backing anon supports kind missing only"),
        (["--continue-twice", "--kind", "missing"], "needs kind minor and policy continue or copy"),
        (["--continue-twice", "--policy", "batch"], "needs kind minor and policy continue or copy"),
        (["--no-thread-id", "--pattern", "zipf", "--threads", "2"], "without thread ids"),
        (["--backing", "hugetlb", "--kind", "missing", "--zeropage-fraction", "0.5"],
         "hugetlb has no UFFDIO_ZEROPAGE"),
    ],
)
def test_bad_input_is_one_line(args, message):
    out = uffdtrace("exercise", *args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert out.stdout == ""


def test_hugepages_without_root_is_one_line():
    needed = available_hugepages() + 1
    out = uffdtrace("exercise", "--backing", "hugetlb", "--pages", str(needed), user=NOBODY)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"need {needed} free 2 MiB hugepages" in lines[0], out.stderr


def test_shmem_needs_no_root():
    """UFFD_USER_MODE_ONLY: minor faults on shmem work for an unprivileged user."""
    out = uffdtrace("exercise", "--pages", "50", "--json", user=NOBODY)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["faults"] == 50


def test_continue_twice_in_the_ops_csv(tmp_path):
    ops = tmp_path / "ops.csv"
    out = uffdtrace("exercise", "--pages", "64", "--continue-twice", "--handler", "process",
                    "--json", "--ops-csv", str(ops))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    o = pd.read_csv(ops)
    assert len(o) == 128 and set(o["op"]) == {"continue"}
    assert (o.groupby("addr").size() == 2).all() and o["addr"].nunique() == 64
    assert (o["errno"] == 17).sum() == 64
    assert o.groupby("role")["errno"].agg(set).to_dict() == {"resolve": {0}, "repeat": {17}}
    assert (o[o["role"] == "repeat"]["mapped"] == -17).all()
    assert summary["continue_twice"] is True and summary["repeats_eexist"] == 64
    assert summary["errors_by_errno"] == {"EEXIST": 64} and summary["mismatches"] == 0


def test_no_thread_id_counts_every_fault(tmp_path):
    faults = tmp_path / "faults.csv"
    out = uffdtrace("exercise", "--pages", "200", "--threads", "4", "--pattern", "random",
                    "--no-thread-id", "--json", "--csv", str(faults))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["thread_id"] is False and summary["faults"] == summary["touches"] == 200
    f = pd.read_csv(faults)
    assert len(f) == 200 and sorted(f["page"]) == list(range(200))
    assert (f["ptid"] == 0).all() and f["tid"].nunique() == 4 and (f["tid"] > 0).all()
    assert f["stall_ns"].notna().all() and sorted(f["thread"].unique()) == [0, 1, 2, 3]


def test_reuse_fd_in_the_summary():
    out = uffdtrace("exercise", "--pages", "64", "--handler", "process", "--reuse-fd", "--json")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["reuse_fd"] is True and s["reuse_fd_verified"] is True
    assert s["reuse_fd_reads"] == 10 and s["reuse_fd_bytes"] > 0
    assert s["reuse_fd_pid"] == s["handler_pid"] != s["pid"]
    assert isinstance(s["reuse_fd_number"], int) and s["reuse_fd_number"] >= 0
    human = uffdtrace("exercise", "--pages", "64", "--reuse-fd")
    assert human.returncode == 0, human.stderr
    assert "reused by pid" in human.stdout and "10 reads" in human.stdout


def test_anon_backing(tmp_path):
    ops = tmp_path / "ops.csv"
    out = uffdtrace("exercise", "--backing", "anon", "--pages", "128", "--zeropage-fraction",
                    "0.25", "--write-fraction", "0.5", "--json", "--ops-csv", str(ops))
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["backing"] == "anon" and s["kind"] == "missing" and s["faults"] == 128
    assert s["mismatches"] == 0 and s["pages_verified"] == 128 and s["errors"] == 0
    o = pd.read_csv(ops)
    counts = o["op"].value_counts().to_dict()
    assert counts == s["ioctls"] and counts["copy"] + counts["zeropage"] == 128
    assert counts["zeropage"] > 0 and counts["copy"] > 0
