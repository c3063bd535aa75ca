"""The tracer against the exerciser's ground truth, on the real kernel (issue: tracer core).

Each case runs `uffdtrace record -- uffdtrace exercise ...` and compares the recorded CSV with
the exerciser's own per-fault timings: counts exactly, each fault's kernel interval inside its
touch, stall within 5 % or 2 µs at p50, overall and per path (p99: `make bench`), every
CONTINUE seen, the seed's errnos on misuse, nothing from untraced processes.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import child_processes, handler_processes
from uffdtrace.events import FAULT_COLUMNS, IOCTL_COLUMNS
from uffdtrace.exerciser.compare import match_faults, misattributed, unrecorded_ioctls
from uffdtrace.probes.tracepoint import TraceScope
from uffdtrace.session import Session
from uffdtrace.targets import LaunchedCommand

pytestmark = [pytest.mark.root]

UFFDTRACE = [sys.executable, "-m", "uffdtrace"]


def record(tmp: Path, mode: str, exercise_args: list[str]) -> tuple:
    """(recorded CSV, record summary, ground-truth faults, ground-truth ioctls, its summary);
    in full mode the recorded ioctls are in tmp/ioctls.csv."""
    rec_csv, gt_csv, ops_csv, gt_json = (tmp / n for n in ("rec.csv", "gt.csv", "ops.csv", "gt.json"))
    workload = shlex.join([*UFFDTRACE, "exercise", *exercise_args, "--csv", str(gt_csv),
                           "--ops-csv", str(ops_csv), "--json"])
    ioctls = ["--ioctls", str(tmp / "ioctls.csv")] if mode == "full" else []
    out = subprocess.run(
        [*UFFDTRACE, "record", "--mode", mode, "-o", str(rec_csv), *ioctls, "--json", "--",
         "sh", "-c", f"{workload} > {gt_json}"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["command_exit"] == 0, (out.stderr, gt_json.read_text() if gt_json.exists() else "")
    rec = pd.read_csv(rec_csv)
    assert list(rec.columns) == list(FAULT_COLUMNS)
    return rec, summary, pd.read_csv(gt_csv), pd.read_csv(ops_csv), json.loads(gt_json.read_text())


def check_ioctl_records(path: Path, ops: pd.DataFrame) -> None:
    io = pd.read_csv(path)
    assert list(io.columns) == list(IOCTL_COLUMNS)
    missing = unrecorded_ioctls(io, ops)
    assert missing.empty, f"{len(missing)} ioctls not recorded as made:\n{missing.head().to_string()}"


def check_resolvers(rec: pd.DataFrame, ops: pd.DataFrame) -> None:
    wrong = misattributed(rec, ops)
    assert wrong.empty, f"{len(wrong)} faults misattributed:\n{wrong.head().to_string()}"


PATH_COLUMNS = ["tid", "handler_tid", "resolver", "slept"]
PATH_MIN_FAULTS = 20


def check_per_fault(rec: pd.DataFrame, gt: pd.DataFrame, gt_summary: dict) -> None:
    """Every fault's kernel interval inside its touch; the stall within 5 % or 2 µs of the touch
    at p50, over all faults and over the faults of each path the tracer tells apart (faulting
    thread, resolving thread and ioctl, slept or not): an error confined to one path moves
    that path's median (see the test for why not p99 here)."""
    faults = match_faults(rec, gt, gt_summary["page_size"])
    outside = faults[(faults["entry_ns"] < 0) | (faults["exit_ns"] < 0)]
    assert outside.empty, f"kernel interval outside the touch:\n{outside.head()}"
    if len(faults) < PATH_MIN_FAULTS:  # the prefetcher won nearly every race: no median
        return
    gap = faults["touch_ns"] - faults["stall_ns"]
    assert faults["error"].median() <= 1, np.percentile(gap, [50, 90, 99, 100]).round().tolist()
    paths = faults.assign(gap_ns=gap).groupby(PATH_COLUMNS, dropna=False).agg(
        faults=("error", "size"), error=("error", "median"), gap_ns=("gap_ns", "median"))
    paths = paths[paths["faults"] >= PATH_MIN_FAULTS]
    assert (paths["error"] <= 1).all(), paths.to_string()


CASES = [
    # backing, threads, handler, policy
    ("shmem", 1, "thread", "continue"),
    ("shmem", 4, "process", "copy"),
    ("shmem", 4, "thread", "batch"),
    ("shmem", 1, "process", "prefetch"),
    ("hugetlb", 1, "thread", "continue"),
    ("hugetlb", 4, "process", "continue"),
    ("hugetlb", 4, "thread", "copy"),
    ("hugetlb", 1, "thread", "batch"),
    ("hugetlb", 4, "process", "prefetch"),
]


@pytest.mark.parametrize("mode", ["full", "light"])
@pytest.mark.parametrize(("backing", "threads", "handler", "policy"), CASES)
@pytest.mark.hugepages
def test_matches_ground_truth(tmp_path, mode, backing, threads, handler, policy):
    pages = 3000 if backing == "shmem" else 1000
    args = ["--backing", backing, "--pages", str(pages), "--threads", str(threads),
            "--handler", handler, "--policy", policy]
    if policy == "copy":
        args += ["--stale-fraction", "0.5"]
    # Pinned to one CPU so that the comparison measures the tracer, not the scheduler
    # (test_unpinned_counts covers the cross-CPU paths).
    args += ["--cpus", "0"]
    rec, summary, gt, ops, gt_summary = record(tmp_path, mode, args)

    assert summary["lost_total"] == 0
    assert (rec["kind"] == "minor").all(), "only minor faults in a minor-mode run"
    minor = rec
    if policy == "prefetch":
        # The exerciser counts the messages its handlers read. A fault that the prefetcher's
        # CONTINUE resolved before any handler read it is withdrawn from the queue unread, yet
        # the thread did wait: the tracer has those too, each woken by the prefetcher.
        known = minor.set_index(["tid", "addr"]).index.isin(list(zip(gt["tid"], gt["addr"], strict=True)))
        extra = minor[~known]
        assert known.sum() == len(gt)
        if mode == "full":
            prefetches = ops[ops["role"] == "prefetch"]
            by_prefetcher = set(zip(prefetches["handler_tid"], prefetches["addr"], strict=True))
            assert all((h, a) in by_prefetcher for h, a in zip(
                extra["handler_tid"], extra["addr"] // gt_summary["page_size"] * gt_summary["page_size"],
                strict=True))
        assert summary["faults"] == len(minor)
        minor = minor[known]
        if minor.empty:  # the prefetcher won every race
            return
    assert len(minor) == len(gt) == gt_summary["faults"], summary["by_backing_kind"]
    assert (minor["backing"] == backing).all()
    assert (minor["page_size"] == gt_summary["page_size"]).all()
    waited = minor["outcome"] == "resolved"
    assert (waited | (minor["outcome"] == "no_wait")).all()
    assert waited.mean() > 0.9

    # Per fault, matched by thread and page: the kernel's interval lies inside the touch, and
    # |touch - stall| is within 5 % or 2 µs at p50, overall and per path. The gap is the
    # exception entry and exit (~1 µs here), which no tracepoint sees, and on this VM the host
    # takes time there that no guest tracepoint sees either: in busy periods up to 10 % of
    # touches get 1-5 µs more, and up to 4 % of hugetlb touches 75-190 µs more in the retried
    # access, after the kernel has returned to user mode. The tail is the host's as much as
    # the tracer's, so p99 is measured by `make bench`, next to a witness of the host's share.
    check_per_fault(minor, gt, gt_summary)
    assert set(rec["handler_pid"].dropna()) <= {gt_summary["pid"], gt_summary["handler_pid"]}
    assert minor["msg_ns"].notna().all(), "both modes read every message a handler read"

    if mode == "full":
        seen = {(i["ioctl"], i["errno"]): i["count"] for i in summary["ioctls"]}
        truth = ops.groupby(["op", "errno"]).size()
        for (op, errno), n in truth.items():
            assert seen.get((op.upper(), errno)) == n, (op, errno, seen)
        check_ioctl_records(tmp_path / "ioctls.csv", ops)
        # Every fault, slept or not, names the ioctl that resolved it, as the exerciser did it.
        check_resolvers(minor, ops)
        expected_resolvers = {"batch": {"WAKE"}, "prefetch": {"CONTINUE", "WAKE"}}
        assert set(minor["resolver"]) <= expected_resolvers.get(policy, {"CONTINUE"})
        assert (minor["errno"] == 0).all()
        assert minor.loc[waited, "continue_ns"].notna().all()
    else:
        for col in ("resolver", "continue_ns", "handler_ns", "errno", "mapped"):
            assert rec[col].isna().all(), col


@pytest.mark.parametrize(
    ("backing", "misuse", "expected_errno"),
    [
        # The seed says EINVAL for CONTINUE on a shmem missing fault; 6.18 returns EFAULT
        # (measured by the exerciser; test_exerciser pins the kernel's answer).
        ("shmem", "continue-on-missing", 14),
        ("hugetlb", "continue-on-missing", 14),
        ("shmem", "copy-on-minor", 17),
        ("hugetlb", "copy-on-minor", 17),
        ("shmem", "zeropage-on-minor", 17),
        ("hugetlb", "zeropage-on-minor", 22),
    ],
)
@pytest.mark.hugepages
def test_misuse_errnos_in_records(tmp_path, backing, misuse, expected_errno):
    """Each fault first gets the wrong ioctl (it fails with the seed's errno), then the right
    one: the fault rows carry the resolving ioctl's errno (0), the ioctl rows the failures."""
    pages = 200 if backing == "shmem" else 16
    rec, summary, _, ops, gt_summary = record(
        tmp_path, "full", ["--backing", backing, "--pages", str(pages), "--misuse", misuse])
    assert gt_summary["misuse_errno"] == expected_errno
    assert len(rec) == gt_summary["faults"]
    assert (rec["errno"] == 0).all() and summary["errnos"] == {}
    check_ioctl_records(tmp_path / "ioctls.csv", ops)
    failed = pd.read_csv(tmp_path / "ioctls.csv").query("errno != 0")
    assert len(failed) == len(rec) and (failed["errno"] == expected_errno).all()
    expected_kind = "missing" if misuse == "continue-on-missing" else "minor"
    assert (rec["kind"] == expected_kind).all()


@pytest.mark.parametrize("mode", ["full", "light"])
@pytest.mark.parametrize(("backing", "handler"), [("shmem", "thread"), ("hugetlb", "process")])
@pytest.mark.hugepages
def test_handlers_as_others_write_them(tmp_path, mode, backing, handler):
    """The kernel selftests' habits: no UFFD_FEATURE_THREAD_ID, every CONTINUE issued twice
    (the second fails with EEXIST and wakes no one), and at the end the uffd's fd number
    reopened on an ordinary file that is read. Each fault gets its message (matched by address
    space and page), its resolving CONTINUE and errno 0; the repeats are ioctl rows; the
    file's reads are not decoded as uffd messages."""
    pages = 2000 if backing == "shmem" else 200
    rec, summary, gt, ops, gt_summary = record(tmp_path, mode, [
        "--backing", backing, "--pages", str(pages), "--threads", "2", "--handler", handler,
        "--no-thread-id", "--continue-twice", "--reuse-fd"])
    assert (gt["ptid"] == 0).all() and gt_summary["reuse_fd_reads"] == 10
    assert summary["lost_total"] == 0
    assert len(rec) == len(gt) == gt_summary["faults"]
    assert summary["uffd_events"] == []
    # Paths are known from a stack sampled in handle_userfault; a thread woken before it slept
    # there leaves none, and with 2 MiB pages each fault is a region of its own (README: Known
    # limits). The kind comes from the message, which both modes read.
    unsampled = rec["block_ns"].isna() & rec["backing"].isna()
    assert (rec.loc[~unsampled, "backing"] == backing).all()
    assert backing == "hugetlb" or not unsampled.any()
    assert (rec["kind"] == "minor").all()
    # every message: read after the fault began and before the exerciser saw its read return
    joined = rec.merge(gt, on="tid", suffixes=("", "_gt"))
    joined = joined[joined["addr"] // gt_summary["page_size"] == joined["addr_gt"] // gt_summary["page_size"]]
    assert len(joined) == len(gt)
    assert ((joined["fault_ns"] <= joined["msg_ns"]) & (joined["msg_ns"] <= joined["msg_ns_gt"])).all()
    assert summary["messages_matched_by_address"] == len(gt) and summary["messages_unmatched"] == 0
    if mode == "light":
        return
    check_ioctl_records(tmp_path / "ioctls.csv", ops)
    assert (ops["role"] == "repeat").sum() == len(gt)
    check_resolvers(rec, ops)
    assert (rec["errno"] == 0).all() and summary["errnos"] == {}


@pytest.mark.parametrize("mode", ["full", "light"])
def test_anonymous_memory(tmp_path, mode):
    """QEMU's default guest RAM: private anonymous memory, MISSING faults resolved by COPY and
    ZEROPAGE. Backing and kind are known in both modes."""
    rec, summary, gt, ops, _ = record(tmp_path, mode, [
        "--backing", "anon", "--pages", "2000", "--threads", "2", "--zeropage-fraction", "0.3"])
    assert len(rec) == len(gt) and summary["lost_total"] == 0
    assert (rec["backing"] == "anon").all() and (rec["kind"] == "missing").all()
    if mode == "full":
        check_ioctl_records(tmp_path / "ioctls.csv", ops)
        check_resolvers(rec, ops)
        assert set(rec["resolver"]) == {"COPY", "ZEROPAGE"}


def test_a_fault_whose_handler_died(tmp_path):
    """The handler process is killed while a thread waits for it: `record` says so while it
    runs, and the fault is written unresolved, with no resolver and no handler (the thread
    was woken by the uffd's release, the last holder having died)."""
    csv = tmp_path / "rec.csv"
    proc = subprocess.Popen(
        [*UFFDTRACE, "record", "-o", str(csv), "--json", "--", *UFFDTRACE, "exercise",
         "--pages", "3", "--handler", "process", "--fetch-delay-us", "30000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        warning = ""
        while "blocked for" not in warning:
            warning = proc.stderr.readline()
            assert warning, "record ended without a warning"
        (workload,) = child_processes(proc.pid)
        handlers = list(handler_processes(workload))
        assert len(handlers) == 1
        subprocess.run(["kill", "-KILL", str(handlers[0])], check=True)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads(out)
    rec = pd.read_csv(csv)
    stuck = rec[rec["outcome"] != "resolved"]
    assert len(stuck) == 1, rec.to_string()
    assert stuck["outcome"].item() == "released"
    assert stuck[["resolver", "handler_pid", "handler_tid", "errno"]].isna().all().all()
    assert stuck["stall_ns"].item() > 1e9
    assert summary["outcomes"]["released"] == 1


@pytest.mark.parametrize("policy", ["continue", "batch"])
def test_unpinned_counts(tmp_path, policy):
    """4 threads on 2 CPUs: wakeups before the switch-out, remote wakeups, and faults resolved
    before the thread had to sleep (full mode sees their message: outcome no_wait)."""
    rec, summary, gt, _, gt_summary = record(
        tmp_path, "full", ["--pages", "4000", "--threads", "4", "--policy", policy])
    assert summary["lost_total"] == 0
    assert len(rec) == len(gt) == gt_summary["faults"]
    assert set(rec["outcome"]) <= {"resolved", "no_wait"}
    assert (rec["kind"] == "minor").all()
    assert rec["stall_ns"].notna().mean() > 0.9


def test_untraced_processes_are_not_recorded(tmp_path):
    """A second, untraced exerciser faults at the same time: none of its faults show up. Its
    handler thread sleeps on a timer before each CONTINUE, so timer interrupts that land while
    a traced thread is inside a fault wake it from that thread's context. That is not the
    traced thread notifying its handler, and must not start tracing the bystander (it did:
    46k of its faults recorded in such a run)."""
    bystander = subprocess.Popen(
        [*UFFDTRACE, "exercise", "--pages", "100000", "--threads", "2", "--fetch-delay-us", "20",
         "--json"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        rec, _, gt, _, gt_summary = record(tmp_path, "full", [
            "--pages", "100000", "--threads", "4", "--handler", "process"])
    finally:
        other = json.loads(bystander.communicate(timeout=120)[0])
    assert other["faults"] == 100000
    assert set(rec["pid"]) == {gt_summary["pid"]}
    assert len(rec) == len(gt)


def test_existing_process_by_pid(tmp_path):
    """-p PID: a workload that was already running when tracing started."""
    pid_file = tmp_path / "pid"
    work = subprocess.Popen(
        [*UFFDTRACE, "exercise", "--pages", "3000", "--handler", "process", "--delay-s", "6",
         "--pid-file", str(pid_file), "--csv", str(tmp_path / "gt.csv"), "--json"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        for _ in range(100):
            if pid_file.exists() and pid_file.read_text().strip():
                break
            subprocess.run(["sleep", "0.05"])
        pid = int(pid_file.read_text())
        out = subprocess.run(
            [*UFFDTRACE, "record", "-p", str(pid), "-o", str(tmp_path / "rec.csv"), "--json",
             "--duration", "9"],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        gt_summary = json.loads(work.communicate(timeout=60)[0])
    assert out.returncode == 0, out.stderr
    rec = pd.read_csv(tmp_path / "rec.csv")
    assert len(rec) == gt_summary["faults"] == 3000
    assert set(rec["handler_pid"]) == {gt_summary["handler_pid"]}
    # The exerciser's parent hands its uffd to the handler process and closes it, so /proc
    # cannot link them: the handler is found when the first fault notifies it, in time for
    # that fault's read and CONTINUE.
    assert (rec["resolver"] == "CONTINUE").all()
    assert rec["msg_ns"].notna().all()
    summary = json.loads(out.stdout)
    assert any("minor" in r["modes"] and r["pid"] == pid for r in summary["uffd_ranges_at_start"])


@pytest.mark.parametrize(
    "argv",
    [
        ["record"],
        ["record", "-p", "999999999"],
        ["record", "--all", "-p", "1"],
        ["record", "--duration", "-1", "--all"],
        ["record", "--duration", "nan", "--all"],
        ["record", "--duration", "inf", "--all"],
        ["record", "--plugin", "/tmp", "--all"],
        ["record", "--mode", "light", "--ioctls", "/tmp/uffdtrace-ioctls.csv", "--", "true"],
        ["record", "--mode", "nope", "--all"],
        ["record", "--", "/nonexistent/command"],
        ["record", "-o", "/nonexistent/dir/x.csv", "--all"],
        ["record", "--qmp", "/nonexistent/qmp.sock", "--all"],
        ["top", "--qmp", "/nonexistent/qmp.sock", "--all"],
    ],
)
def test_bad_input_is_one_line(argv):
    out = subprocess.run([*UFFDTRACE, *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(("uffdtrace", "usage"))


def test_bad_input_says_what_is_wrong(tmp_path):
    out = subprocess.run([*UFFDTRACE, "record", "--plugin", str(tmp_path), "--all"],
                         capture_output=True, text=True, timeout=60)
    assert out.stderr.strip() == f"uffdtrace: plugin {tmp_path} is a directory: name a Python file in it"
    out = subprocess.run([*UFFDTRACE, "record", "-d", "nan", "--all"], capture_output=True, text=True)
    assert out.stderr.strip() == "uffdtrace: --duration must be a positive number of seconds"


@pytest.mark.parametrize("mode", ["light", "full"])
def test_ebpf_prints_the_program_that_would_run(mode):
    """--ebpf: the compile flags, then the whole program (records.h in place of its #include),
    and nothing is loaded: it compiles to exactly what `record` would run, and attaches what
    the mode needs."""
    out = subprocess.run([*UFFDTRACE, "record", "--mode", mode, "--ebpf", "--", "true"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    flags, program = out.stdout.split("\n", 1)
    assert flags.startswith("// cflags: -D") and "-DFOLLOW_CHILDREN" in flags
    assert ("-DFULL_MODE" in flags) == (mode == "full")
    assert "struct fault_record {" in program and '#include "records.h"' not in program
    from bcc import BPF

    cflags = flags.removeprefix("// cflags: ").split()
    bpf = BPF(text=program, cflags=cflags)
    try:
        attached = {tp.decode() for tp in bpf.raw_tracepoint_fds}
    finally:
        bpf.cleanup()
    assert "sys_exit" in attached  # message reads, in both modes
    assert ("sys_enter" in attached) == (mode == "full")  # uffd ioctls


def test_a_pid_without_userfaultfd_gets_a_hint(tmp_path):
    out = subprocess.run([*UFFDTRACE, "record", "-p", "1", "-d", "0.5", "-o", str(tmp_path / "r.csv")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "uffdtrace: pid 1 holds no userfaultfd now: its faults show once it opens one" in out.stderr


def test_sigterm_leaves_a_complete_csv(tmp_path):
    """SIGTERM mid-run: the tracer stops cleanly and every row it wrote is whole."""
    csv = tmp_path / "rec.csv"
    tracer = subprocess.Popen(
        [*UFFDTRACE, "record", "-o", str(csv), "--json", "--", *UFFDTRACE, "exercise",
         "--pages", "400000", "--threads", "2", "--fetch-delay-us", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(200):  # until rows are flowing
        if csv.exists() and csv.stat().st_size > 100_000:
            break
        subprocess.run(["sleep", "0.05"])
    tracer.terminate()
    out, err = tracer.communicate(timeout=60)
    assert tracer.returncode == 0, err
    summary = json.loads(out)
    rec = pd.read_csv(csv)
    assert list(rec.columns) == list(FAULT_COLUMNS)
    assert 0 < len(rec) == summary["faults"]
    assert rec["stall_ns"].notna().mean() > 0.9
    assert summary["command_exit"] != 0  # the traced command was stopped with the tracer


class StallingSink:
    """Counts rows; its first write blocks for a while, like a disk in writeback."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s, self.rows = stall_s, 0

    def write(self, faults: pd.DataFrame) -> None:
        if self.stall_s:
            time.sleep(self.stall_s)
            self.stall_s = 0
        self.rows += len(faults)

    def close(self) -> None:
        pass


def test_stalled_sink_loses_nothing():
    """A sink that blocks for 6 s while ~200k faults/s go on (full mode: ~2 records each, more
    than the 128 MiB ring holds): the records wait in the session's backlog, none is lost."""
    sink = StallingSink(stall_s=6.0)
    launched = LaunchedCommand(["sh", "-c", " ".join(
        [*UFFDTRACE, "exercise", "--pages", "300000", "--cpus", "0", ">", "/dev/null", ";"] * 4)])
    session = Session("full", TraceScope(pids=(launched.pid,), follow_children=True), [sink])
    try:
        session.start()
        launched.release()
        session.run(until=lambda: launched.poll() is not None)
    finally:
        info = session.close()
        launched.wait()
    assert launched.returncode == 0
    assert sum(info["lost"].values()) == 0, info["lost"]
    assert sink.rows == session.stats.faults == 4 * 300_000


def test_all_processes(tmp_path):
    """--all: faults of a process the tracer was never told about."""
    csv = tmp_path / "rec.csv"
    tracer = subprocess.Popen([*UFFDTRACE, "record", "--all", "-o", str(csv), "--json",
                               "--duration", "8"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        status = tracer.stderr.readline()  # printed once the probes are attached
        assert "started in" in status, status
        work = subprocess.run([*UFFDTRACE, "exercise", "--pages", "2000", "--json"],
                              capture_output=True, text=True, check=True)
    finally:
        _, err = tracer.communicate(timeout=60)
    assert tracer.returncode == 0, err
    gt = json.loads(work.stdout)
    rec = pd.read_csv(csv)
    mine = rec[rec["pid"] == gt["pid"]]
    assert len(mine) == gt["faults"] == 2000
    assert (mine["kind"] == "minor").all()


def test_kprobe_backend_is_refused_here():
    out = subprocess.run([*UFFDTRACE, "record", "--backend", "kprobe", "--all", "-d", "1",
                          "-o", "/dev/null"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "kprobes missing" in out.stderr and "tracepoint backend" in out.stderr


def test_untrack_drops_thread_state():
    """A thread with BPF state counts as tracked; untracking its process drops that state.
    (Calibration tracks the tracer's own process for a moment.)"""
    import mmap
    import os
    import threading

    from uffdtrace.probes.tracepoint import TracepointBackend, TraceScope

    backend = TracepointBackend(mode="light", scope=TraceScope())
    backend.start()
    try:
        me = threading.get_native_id()
        states = backend._bpf["inflight"]
        backend.track(os.getpid())
        with mmap.mmap(-1, 64 << 12) as fresh:
            fresh[::4096] = b"x" * 64  # page faults of this thread, now tracked
            assert me in {k.value for k in states}
            backend.untrack(os.getpid())
            assert me not in {k.value for k in states}
        with mmap.mmap(-1, 64 << 12) as fresh:
            fresh[::4096] = b"x" * 64
            assert me not in {k.value for k in states}
    finally:
        backend.close()
