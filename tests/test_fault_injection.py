"""Fault injection (issue #16): the real CLI is hurt while it runs, then the aftermath is
checked. Each run is a process group of its own; afterwards (conftest.MachineState):
1. no BPF program the tracer held is still loaded;
2. kernel.bpf_stats_enabled as before;
3. the hugepage pool as before: a SIGKILLed run's pages stay in the pool until the next run
   that reserves gives them back (README; uffdtrace/exerciser/hugepages.py), so those cases
   run one and check that it does;
4. network namespaces and veth links as before (a SIGKILLed `migrate` leaves its own, and the
   next `migrate` removes them);
5. no process of the run left (its process group, waited for);
6. every CSV written has whole rows only, and pandas and `uffdtrace report` read it.
Full disk and closed pipe are in tests/test_write_failures.py, with the same checks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import (
    MachineState,
    bpf_stats_holders,
    child_processes,
    creator,
    group_members,
    handler_processes,
    held_bpf_programs,
    hugepage_ledger,
    net_objects,
    read_stderr_until,
    report_accepts,
    tracing_started,
    wait_until,
    whole_rows,
)
from uffdtrace.exerciser import hugepages
from uffdtrace.exerciser.hugepages import available_hugepages
from uffdtrace.targets import alive

pytestmark = [pytest.mark.root, pytest.mark.hugepages, pytest.mark.netns]

UFFDTRACE = [sys.executable, "-m", "uffdtrace"]
HUGETLB_EXERCISE = [*UFFDTRACE, "exercise", "--backing", "hugetlb"]
FOREVER_US = "600000000"  # a handler that takes 10 min per fault: the faults wait until killed
COMPLETE = {"resolved", "no_wait"}
SUMMARY = "tracer cost:"  # a line of record's summary


def start(args: list[str], stdout: int = subprocess.PIPE) -> subprocess.Popen:
    """`uffdtrace ARGS` in a process group of its own (pgid = its pid)."""
    return subprocess.Popen([*UFFDTRACE, *args], stdout=stdout, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@contextlib.contextmanager
def run_group(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """Whatever a failed check leaves of the run's process group is ended (SIGTERM, then
    SIGKILL): no test leaves processes behind. A passing test has already waited for it."""
    try:
        yield proc
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if group_members(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(AssertionError):
                    wait_until(lambda: not group_members(proc.pid), 30, "group ended")
        proc.kill()
        proc.communicate()


def hugetlb_pages(extra: int) -> str:
    """More 2 MiB pages than are free, so that the run grows the pool and must give back."""
    return str(available_hugepages() + extra)


def data_rows(path: Path) -> int:
    """Complete rows written so far (the header excluded)."""
    return max(path.read_bytes().count(b"\n") - 1, 0) if path.exists() else 0


def pid_in(path: Path) -> int:
    return int(wait_until(lambda: path.exists() and path.read_text().strip(), 120,
                          f"pid file {path}"))


def waiting_in_faults(pid: int) -> int:
    """Threads of `pid` asleep in a userfaultfd fault now."""
    count = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            count += (task / "wchan").read_text() == "handle_userfault"
    return count


def cmdline(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]
    return []


def children_running(pid: int, command: list[str]) -> set[int]:
    """Children of `pid` whose command line is `command`."""
    return {c for c in child_processes(pid) if cmdline(c) == command}


def signal_caught(pid: int, sig: int) -> bool:
    """`pid` has a handler for `sig` (SigCgt in /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(re.search(r"^SigCgt:\s*(\w+)", status, re.M)[1], 16) >> (sig - 1) & 1)


def check_csvs(faults: Path, ioctls: Path | None = None) -> pd.DataFrame:
    """(6) The fault CSV (and ioctl CSV) whole rows only, read by pandas and by report."""
    rows = whole_rows(faults.read_text())
    if ioctls is None:
        report_accepts(faults)
    else:
        whole_rows(ioctls.read_text())
        report_accepts(faults, "--ioctls", str(ioctls))
    return rows


def summarised(tracer: subprocess.Popen, err: str) -> None:
    """record ended by itself, printed its summary and exited 0, without a traceback."""
    assert tracer.returncode == 0, err
    assert SUMMARY in err and "Traceback" not in err, err


# --- SIGKILL of the tracer ------------------------------------------------------------------

def test_sigkill_of_the_tracer_of_a_command(tmp_path):
    """The traced command runs on, untraced and unharmed, to its end; the kernel detaches BPF
    and turns the stats off (they were held by an fd of the tracer's, not by the sysctl) as the
    tracer's fds close; the CSVs end at a whole row."""
    state = MachineState.now()
    csv, ioctls, gt, pid_file = (tmp_path / n for n in ("f.csv", "io.csv", "gt.json", "ex.pid"))
    pages = hugetlb_pages(12)  # 0.4 s per fault: about 5 s of faults
    exercise = shlex.join([*HUGETLB_EXERCISE, "--pages", pages, "--threads", "2", "--handler",
                           "process", "--fetch-delay-us", "400000", "--pid-file", str(pid_file),
                           "--json"])
    with run_group(start(["record", "-o", str(csv), "--ioctls", str(ioctls), "--",
                          "sh", "-c", f"{exercise} > {gt}"])) as tracer:
        _, held = tracing_started(tracer)
        assert bpf_stats_holders([tracer.pid]) == {tracer.pid}  # stats by fd, not the sysctl
        wait_until(lambda: data_rows(csv), 120, "a first row")
        exerciser = pid_in(pid_file)
        assert alive(exerciser), "the workload ended before the tracer was killed"
        tracer.kill()
        tracer.wait()
        state.check_restored(bpf_programs=held, pgids=[tracer.pid], pids=[exerciser])
    assert json.loads(gt.read_text())["faults"] == int(pages)  # every page, and verified
    check_csvs(csv, ioctls)


def test_sigkill_of_the_tracer_of_a_pid(tmp_path):
    """`record -p` killed: the process it traced runs on (and stops cleanly later)."""
    state = MachineState.now()
    csv, ioctls, pid_file = (tmp_path / n for n in ("f.csv", "io.csv", "ex.pid"))
    workload = start(["exercise", "--backing", "hugetlb", "--pages", hugetlb_pages(64),
                      "--fetch-delay-us", "1000000", "--pid-file", str(pid_file)],
                     stdout=subprocess.DEVNULL)  # 1 s per fault: a minute at least
    with run_group(workload):
        tracer = start(["record", "-p", str(pid_in(pid_file)), "-o", str(csv), "--ioctls",
                        str(ioctls)])
        with run_group(tracer):
            _, held = tracing_started(tracer)
            wait_until(lambda: data_rows(csv), 120, "a first row")
            tracer.kill()
            tracer.wait()
            assert workload.poll() is None, "the traced process did not survive its tracer"
            workload.send_signal(signal.SIGTERM)  # a clean stop: it gives its hugepages back
            _, err = workload.communicate(timeout=120)
            assert workload.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
            state.check_restored(bpf_programs=held, pgids=[tracer.pid, workload.pid],
                                 pids=[workload.pid])
    check_csvs(csv, ioctls)


NEVER_RUN = """
import ctypes, os, sys
from uffdtrace.targets import LaunchedCommand
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans below are reparented here
tracer = os.fork()
if tracer == 0:  # a tracer that dies before it releases its command
    LaunchedCommand(["touch", sys.argv[1]])
    os.kill(os.getpid(), 9)
os.waitpid(tracer, 0)
_, status = os.wait()  # its command, an orphan now
print(os.waitstatus_to_exitcode(status))
"""


def test_a_command_whose_tracer_died_before_tracing_never_runs(tmp_path):
    """`record -- COMMAND` holds COMMAND until tracing has begun; killed before that, it must
    not start it untraced (it did: the held child saw end-of-file and exec'd anyway)."""
    marker = tmp_path / "ran"
    out = subprocess.run([sys.executable, "-c", NEVER_RUN, str(marker)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1" and not marker.exists(), out.stdout


def test_ctrl_c_reaching_the_held_command_ends_the_run_with_its_summary(tmp_path):
    """Ctrl-C at start-up reaches the command too, while it waits to be released. It ends
    there, and the run ends as on any Ctrl-C: summary, exit 0 (it exited 1, silently: the
    release met a broken pipe, taken for a closed stdout; and the waiting child unwound a copy
    of uffdtrace's own stack)."""
    state = MachineState.now()
    with run_group(start(["record", "-o", str(tmp_path / "f.csv"), "--", "sleep", "600"])
                   ) as tracer:
        (child,) = wait_until(lambda: children_running(tracer.pid, cmdline(tracer.pid)), 120,
                              "the held command (a fork of the tracer, not exec'd yet)")
        wait_until(lambda: not signal_caught(child, signal.SIGINT), 120,
                   "the held command on SIGINT's default action")
        os.kill(child, signal.SIGINT)
        early, held = tracing_started(tracer)
        _, err = tracer.communicate(timeout=300)
        state.check_restored(bpf_programs=held, pgids=[tracer.pid])
    summarised(tracer, early + err)
    check_csvs(tmp_path / "f.csv")


def test_a_broken_pipe_inside_the_traced_command_is_its_own(tmp_path):
    """Python ignores SIGPIPE and SIGXFSZ; a traced command must not inherit that, or `yes |
    head` complains of a broken pipe instead of yes ending silently, as from a shell."""
    state = MachineState.now()
    sigign = tmp_path / "sigign"
    with run_group(start(["record", "-o", str(tmp_path / "f.csv"), "--", "sh", "-c",
                          f"grep SigIgn /proc/self/status > {sigign}; yes | head -n 1"])
                   ) as tracer:
        early, held = tracing_started(tracer)
        out, err = tracer.communicate(timeout=300)
        state.check_restored(bpf_programs=held, pgids=[tracer.pid])
    summarised(tracer, early + err)
    assert out == "y\n" and "Broken pipe" not in err, err
    ignored = int(sigign.read_text().split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1)), hex(ignored)
    check_csvs(tmp_path / "f.csv")


# --- SIGKILL inside the traced workload -----------------------------------------------------

THREADS = 4


def start_blocked_workload(tmp: Path) -> tuple[subprocess.Popen, set[int], int, int]:
    """`record -- exercise` with a handler process that takes 10 min per fault, once every
    faulting thread waits in its fault: the tracer, its BPF programs, the exerciser's pid and
    its handler process's (found among the exerciser's children)."""
    tracer = start(["record", "-o", str(tmp / "f.csv"), "--ioctls", str(tmp / "io.csv"), "--",
                    *HUGETLB_EXERCISE, "--pages", hugetlb_pages(8), "--threads", str(THREADS),
                    "--handler", "process", "--fetch-delay-us", FOREVER_US,
                    "--pid-file", str(tmp / "ex.pid")])
    _, held = tracing_started(tracer)
    exerciser = pid_in(tmp / "ex.pid")
    wait_until(lambda: waiting_in_faults(exerciser) == THREADS, 120,
               "every faulting thread waiting in its fault")
    (handler,) = wait_until(lambda: handler_processes(exerciser), 120, "the handler process")
    return tracer, held, exerciser, handler


def test_sigkill_of_the_handler_process_while_threads_wait(tmp_path):
    """The faults in flight are written as released (their uffd's last holder died), never as
    resolved, with no resolver; the workload ends with its error, the tracer by itself."""
    state = MachineState.now()
    tracer, held, exerciser, handler = start_blocked_workload(tmp_path)
    with run_group(tracer):
        os.kill(handler, signal.SIGKILL)
        _, err = tracer.communicate(timeout=300)
        summarised(tracer, err)
        state.check_restored(bpf_programs=held, pgids=[tracer.pid], pids=[exerciser, handler])
    rows = check_csvs(tmp_path / "f.csv", tmp_path / "io.csv")
    assert len(rows) == THREADS, rows.to_string()  # one fault in flight per thread
    assert set(rows["outcome"]) <= {"released", "unresolved_exit", "unresolved_end"}, rows.to_string()
    assert rows[["resolver", "handler_pid", "handler_tid", "errno"]].isna().all().all()


def test_sigkill_of_the_workload_while_threads_wait(tmp_path):
    """The threads exit inside their faults: unresolved_exit rows. The tracer ends as the
    command did, with its summary. The exerciser could not give its hugepages back: they stay
    in the pool until the next run that reserves, which returns them."""
    state = MachineState.now()
    tracer, held, exerciser, handler = start_blocked_workload(tmp_path)
    with run_group(tracer):
        with hugepages._pool_lock():  # no other run can give the pages back meanwhile
            os.kill(exerciser, signal.SIGKILL)
            wait_until(lambda: not alive(exerciser), 120, "the exerciser killed")
            assert exerciser in hugepage_ledger(), "the killed run's hugepages are already back"
        _, err = tracer.communicate(timeout=300)
        summarised(tracer, err)
        nxt = subprocess.run([*HUGETLB_EXERCISE, "--pages", "2"], capture_output=True,
                             text=True, timeout=300)
        assert nxt.returncode == 0, nxt.stderr
        state.check_restored(bpf_programs=held, pgids=[tracer.pid], pids=[exerciser, handler])
    rows = check_csvs(tmp_path / "f.csv", tmp_path / "io.csv")
    assert (rows["outcome"] == "unresolved_exit").sum() == THREADS, rows.to_string()
    assert set(rows["outcome"]) <= COMPLETE | {"unresolved_exit"}, rows.to_string()


def test_sigkill_of_a_traced_migration(tmp_path):
    """`uffdtrace migrate` (hugetlb, 10 Mbit/s: seconds per page) killed during post-copy: its
    nodes die with it, its namespaces and hugepages stay, and the next `migrate` removes and
    returns them."""
    state = MachineState.now()
    csv, ioctls = tmp_path / "f.csv", tmp_path / "io.csv"
    migrate_command = [*UFFDTRACE, "migrate", "--size", "32", "--backing", "hugetlb", "--rounds",
                       "0", "--no-prefetch", "--bandwidth", "0.01", "--stall-timeout", "600"]
    with run_group(start(["record", "-o", str(csv), "--ioctls", str(ioctls), "--",
                          *migrate_command])) as tracer:
        _, held = tracing_started(tracer)
        (migrate,) = wait_until(lambda: children_running(tracer.pid, migrate_command), 120,
                                "the command, released")
        wait_until(lambda: data_rows(csv), 300, "a first post-copy fault")
        ours = {n for n in net_objects() if creator(n) == migrate}
        assert len(ours) == 2, ours  # its source and target namespaces
        with hugepages._pool_lock():  # no other run can give the pages back meanwhile
            os.kill(migrate, signal.SIGKILL)
            wait_until(lambda: not alive(migrate), 120, "migrate killed")
            assert migrate in hugepage_ledger(), "the killed run's hugepages are already back"
        assert ours <= net_objects()  # left until the next start
        _, err = tracer.communicate(timeout=300)
        summarised(tracer, err)
        nxt = subprocess.run([*UFFDTRACE, "migrate", "--size", "4", "--backing", "hugetlb",
                              "--rounds", "0", "-j"], capture_output=True, text=True, timeout=300)
        assert nxt.returncode == 0, nxt.stderr
        assert ours <= set(json.loads(nxt.stdout)["removed_leftovers"])
        state.check_restored(bpf_programs=held, pgids=[tracer.pid], pids=[migrate])
    rows = check_csvs(csv, ioctls)
    assert set(rows["outcome"]) <= COMPLETE | {"unresolved_exit"}, rows["outcome"].value_counts()


# --- plugins that hang or raise -------------------------------------------------------------

HANGS = """
import threading

from uffdtrace.plugins import Plugin


class Hangs(Plugin):
    name = "hangs"
    description = "never returns from batch()"

    def batch(self, df):
        threading.Event().wait()
"""
RAISES = """
from uffdtrace.plugins import Plugin


class Raises(Plugin):
    name = "raises"
    description = "raises in batch()"

    def batch(self, df):
        raise RuntimeError("injected")
"""
PAGES = 2000


def record_with_plugin(tmp: Path, source: str) -> tuple[str, float]:
    """`record --plugin FILE --plugin latency -- exercise` to its end, checked as every run:
    its stderr, and how long after the command's end record exited."""
    state = MachineState.now()
    (tmp / "plugin.py").write_text(source)
    exercise = shlex.join([*UFFDTRACE, "exercise", "--pages", str(PAGES), "--json"])
    with run_group(start(["record", "-o", str(tmp / "f.csv"), "--plugin", str(tmp / "plugin.py"),
                          "--plugin", "latency", "--plugin-out", str(tmp / "live"), "--", "sh",
                          "-c", f"{exercise} > {tmp / 'gt.json'}; date +%s.%N > {tmp / 'end'}"]
                         )) as tracer:
        early, held = tracing_started(tracer)
        _, err = tracer.communicate(timeout=300)
        after_end_s = time.time() - float((tmp / "end").read_text())
        state.check_restored(bpf_programs=held, pgids=[tracer.pid])
    err = early + err
    assert tracer.returncode == 1, err  # a plugin without its tables
    assert SUMMARY in err and "Traceback" not in err, err
    rows = check_csvs(tmp / "f.csv")
    assert len(rows) == PAGES == json.loads((tmp / "gt.json").read_text())["faults"]
    return err, after_end_s


def latency_counts(directory: Path) -> pd.DataFrame:
    return pd.read_csv(directory / "latency_percentiles.csv")[["backing", "kind", "metric", "count"]]


def test_a_plugin_that_hangs_in_batch_is_cut_at_shutdown(tmp_path):
    """Shutdown does not wait for it: a generous bound after the command's end (2 s for the
    plugins, detaching, exiting); one line names it as cut, and it gives no tables."""
    err, after_end_s = record_with_plugin(tmp_path, HANGS)
    assert after_end_s < 30, err
    cut = re.findall(r"^uffdtrace: plugin hangs skipped (\d+) batches \([\d,]+ faults(?:, [\d,]+ ioctls)?\) "
                     r"at shutdown: still busy 2 s after tracing stopped, so no tables$", err, re.M)
    assert len(cut) == 1 and int(cut[0]) >= 1, err
    assert not list((tmp_path / "live").glob("hangs_*"))
    assert (tmp_path / "live" / "latency_percentiles.csv").exists()  # the other plugin's tables


def test_a_plugin_that_raises_in_batch_is_disabled_alone(tmp_path):
    """One line names it and its error; the latency plugin beside it got every row: its live
    tables count what `report` counts on the same CSV."""
    err, _ = record_with_plugin(tmp_path, RAISES)
    assert [line for line in err.splitlines() if "plugin raises" in line] == [
        "uffdtrace: plugin raises failed in batch(): RuntimeError: injected; disabled"], err
    assert not list((tmp_path / "live").glob("raises_*"))
    report_accepts(tmp_path / "f.csv", "--plugin", "latency", "--out", str(tmp_path / "offline"))
    pd.testing.assert_frame_equal(latency_counts(tmp_path / "live"),
                                  latency_counts(tmp_path / "offline"))


# --- many SIGKILLs ---------------------------------------------------------------------------

def test_ten_tracers_sigkilled_one_after_another(tmp_path):
    """Each `record` (a hugetlb exerciser) is killed once it says it traces; its command runs
    on untraced if it was released already, else never starts. Afterwards no BPF program of
    any of the ten, and nothing else of them, is left."""
    state = MachineState.now()
    held: set[int] = set()
    with contextlib.ExitStack() as runs:
        tracers = []
        for i in range(10):
            tracer = runs.enter_context(run_group(start(
                ["record", "-o", str(tmp_path / f"f{i}.csv"), "--", *HUGETLB_EXERCISE,
                 "--pages", "4", "--pid-file", str(tmp_path / f"ex{i}.pid")],
                stdout=subprocess.DEVNULL)))
            read_stderr_until(tracer, "uffdtrace: tracing")
            ids = held_bpf_programs(tracer.pid)
            assert ids, f"record {i} held no BPF program"
            held |= ids
            tracer.kill()
            tracer.wait()
            tracers.append(tracer)
        exercisers = [int(p.read_text()) for p in tmp_path.glob("ex*.pid") if p.read_text()]
        state.check_restored(bpf_programs=held, pgids=[t.pid for t in tracers], pids=exercisers)
    for i in range(10):
        check_csvs(tmp_path / f"f{i}.csv")

