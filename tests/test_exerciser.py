"""The workload exerciser through its Python API, on the real kernel (no skips: a missing
capability fails loudly)."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import handler_processes

from uffdtrace.errors import UserError
from uffdtrace.exerciser import (
    EXPECTED_MISUSE_ERRNO,
    ExerciseConfig,
    ExerciseResult,
    reserved_hugepages,
    run,
)
from uffdtrace.exerciser.hugepages import LEDGER, NR_HUGEPAGES, available_hugepages, nr_hugepages

pytestmark = [pytest.mark.usefixtures("no_leaks"), pytest.mark.root, pytest.mark.hugepages]

PAGES = {"shmem": 128, "hugetlb": 8, "anon": 128}
FLAG_WRITE, FLAG_MINOR = 1, 4


def assert_sound(res: ExerciseResult) -> None:
    """Every touch done, every record kept, every page holding the intended bytes."""
    s = res.summary
    assert s["overflows"] == 0
    assert s["pages_verified"] == res.config.pages
    assert s["mismatches"] == 0
    assert s["touches"] == len(res.touches) > 0
    assert (res.touches["end_ns"] > res.touches["start_ns"]).all()


def resolving_ops(res: ExerciseResult) -> pd.DataFrame:
    return res.ops[res.ops["role"] == "resolve"]


@pytest.mark.parametrize("backing", ["shmem", "hugetlb"])
@pytest.mark.parametrize("kind", ["minor", "missing"])
def test_each_page_faults_once_and_is_resolved(backing, kind):
    pages = PAGES[backing]
    res = run(ExerciseConfig(backing=backing, kind=kind, pages=pages, write_fraction=0.5))
    assert_sound(res)
    f, t, ops = res.faults, res.touches, res.ops

    assert sorted(t["page"]) == sorted(f["page"]) == list(range(pages))
    assert res.summary["faults"] == pages and res.summary["errors"] == 0
    assert (f["addr"] == res.base + f["page"] * res.page_size).all()
    assert ((f["flags"] & FLAG_MINOR) != 0).all() == (kind == "minor")
    assert ((f["flags"] & FLAG_MINOR) == 0).all() == (kind == "missing")
    assert (f["write"] == ((f["flags"] & FLAG_WRITE) != 0)).all()
    assert 0 < f["write"].sum() < pages
    assert ((f["start_ns"] < f["msg_ns"]) & (f["msg_ns"] < f["end_ns"])).all()
    assert (f["stall_ns"] == f["end_ns"] - f["start_ns"]).all()
    assert set(f["tid"]) == set(t["tid"]) and not set(f["tid"]) & set(f["handler_tid"])
    assert (f["ptid"] == f["tid"]).all()  # UFFD_FEATURE_THREAD_ID by default
    assert res.pid == res.handler_pid == os.getpid()

    assert len(ops) == pages
    assert set(ops["op"]) == {"continue" if kind == "minor" else "copy"}
    assert (ops["errno"] == 0).all() and (ops["mapped"] == res.page_size).all()
    # Each fault's ioctl starts after its message was read and before the touch ends.
    m = f.merge(ops, on="addr", suffixes=("", "_op"), validate="one_to_one")
    assert ((m["msg_ns"] <= m["start_ns_op"]) & (m["start_ns_op"] < m["end_ns"])).all()
    assert (m["handler_tid"] == m["handler_tid_op"]).all()


def test_four_faulting_threads_two_handler_threads():
    res = run(ExerciseConfig(pages=256, threads=4, handler_threads=2, pattern="random",
                             write_fraction=0.3))
    assert_sound(res)
    t, f = res.touches, res.faults
    assert t.groupby("thread")["tid"].nunique().to_dict() == {0: 1, 1: 1, 2: 1, 3: 1}
    assert t.groupby("thread").size().to_dict() == {0: 64, 1: 64, 2: 64, 3: 64}
    assert t["tid"].nunique() == 4
    assert sorted(f["page"]) == list(range(256))
    assert 1 <= f["handler_tid"].nunique() <= 2
    assert set(res.ops["handler_tid"]) == set(f["handler_tid"])
    joined = f.merge(t, on=["tid", "page"], suffixes=("", "_t"), validate="one_to_one")
    assert (joined["thread"] == joined["thread_t"]).all()


@pytest.mark.parametrize("backing", ["shmem", "hugetlb"])
def test_handler_process(backing):
    res = run(ExerciseConfig(backing=backing, pages=PAGES[backing], threads=2,
                             handler="process", handler_threads=2))
    assert_sound(res)
    assert res.handler_pid != res.pid == os.getpid()
    assert res.summary["handler_pid"] == res.handler_pid
    assert not Path(f"/proc/{res.handler_pid}").exists(), "handler process not reaped"
    # The handler threads were not ours, and their records crossed the process boundary.
    ours = {int(task.name) for task in Path("/proc/self/task").iterdir()}
    assert not set(res.faults["handler_tid"]) & (ours | set(res.touches["tid"]))
    assert len(res.faults) == PAGES[backing] and (res.ops["errno"] == 0).all()


@pytest.mark.parametrize("backing", ["shmem", "hugetlb"])
def test_copy_policy_refreshes_stale_pages(backing):
    # The verifier expects the new version in exactly the stale pages: a skipped or
    # misplaced refresh is a mismatch.
    res = run(ExerciseConfig(backing=backing, pages=PAGES[backing], policy="copy",
                             stale_fraction=0.5, handler="process"))
    assert_sound(res)
    assert len(res.faults) == PAGES[backing]
    assert set(res.ops["op"]) == {"continue"}


def test_batch_policy_wakes_once_per_round():
    res = run(ExerciseConfig(pages=256, threads=4, policy="batch"))
    assert_sound(res)
    ops = res.ops
    conts, wakes = ops[ops["op"] == "continue"], ops[ops["role"] == "batch-wake"]
    assert (ops["errno"] == 0).all()
    assert len(conts) == len(res.faults) == 256
    assert 0 < len(wakes) <= len(conts)
    ps = res.page_size
    for fault in res.faults.itertuples():
        cont = conts[conts["addr"] == fault.addr].iloc[0]
        covering = wakes[(wakes["addr"] <= fault.addr) & (fault.addr < wakes["addr"] + wakes["len"])
                         & (wakes["start_ns"] >= cont["end_ns"])]
        assert len(covering) >= 1, fault
        # CONTINUE_MODE_DONTWAKE: the thread cannot run on before the WAKE.
        assert fault.end_ns > covering["start_ns"].min()
        assert covering["len"].iloc[0] % ps == 0


@pytest.mark.parametrize(("handler", "backing"),
                         [("thread", "shmem"), ("process", "shmem"), ("thread", "anon")])
def test_prefetch_race_eexist_then_wake(handler, backing):
    # A slow demand handler (200 ms fetch) against a paced prefetcher that sweeps all pages
    # in well under that: whenever a fault is pending, the prefetcher maps its page first.
    res = run(ExerciseConfig(backing=backing, pages=500, pattern="random", policy="prefetch",
                             handler=handler, fetch_delay_us=200_000, prefetch_interval_us=20))
    assert_sound(res)
    ops = res.ops
    pre = ops[ops["role"] == "prefetch"]
    assert res.summary["prefetched"] == (pre["errno"] == 0).sum() > 0
    lost = resolving_ops(res)
    assert len(lost) == len(res.faults) >= 1
    assert (lost["errno"] == errno.EEXIST).all()
    wakes = ops[ops["role"] == "eexist-wake"]
    assert res.summary["eexist_wakes"] == len(wakes) == len(lost)
    for cont in lost.itertuples():
        wake = wakes[(wakes["addr"] == cont.addr) & (wakes["handler_tid"] == cont.handler_tid)]
        assert len(wake) == 1 and wake["start_ns"].iloc[0] >= cont.end_ns
        assert (wake["errno"] == 0).all()
    assert res.summary["errors_by_errno"] == {"EEXIST": len(lost)}


@pytest.mark.parametrize(
    ("backing", "misuse"),
    [(backing, misuse) for backing in ("shmem", "hugetlb")
     for misuse in ("continue-on-missing", "copy-on-minor", "zeropage-on-minor")]
    + [("anon", "continue-on-missing")],
)
def test_misuse_errno(backing, misuse):
    res = run(ExerciseConfig(backing=backing, pages=PAGES[backing] // 2, misuse=misuse))
    assert_sound(res)
    expected = EXPECTED_MISUSE_ERRNO[misuse, backing]
    assert res.summary["misuse_errno"] == expected
    assert res.summary["kind"] == ("missing" if misuse == "continue-on-missing" else "minor")
    wrong = res.ops[res.ops["role"] == "misuse"]
    right = resolving_ops(res)
    assert len(wrong) == len(right) == len(res.faults) == PAGES[backing] // 2
    assert (wrong["errno"] == expected).all() and (right["errno"] == 0).all()
    assert set(wrong["op"]) == {misuse.split("-on-")[0]}
    assert set(right["op"]) == {"copy" if misuse == "continue-on-missing" else "continue"}
    pair = wrong.merge(right, on="addr", suffixes=("_wrong", "_right"), validate="one_to_one")
    assert (pair["end_ns_wrong"] <= pair["start_ns_right"]).all()
    assert res.summary["errors_by_errno"] == {errno.errorcode[expected]: len(wrong)}


def test_missing_kind_zeropage_fraction():
    res = run(ExerciseConfig(kind="missing", pages=256, zeropage_fraction=0.3))
    assert_sound(res)  # the verifier expects zeros exactly where ZEROPAGE was used
    counts = res.ops["op"].value_counts().to_dict()
    assert counts["zeropage"] > 0 and counts["copy"] > 0
    assert counts["zeropage"] + counts["copy"] == 256


def test_zipf_threads_share_a_hot_set():
    res = run(ExerciseConfig(pages=400, threads=4, handler_threads=2, pattern="zipf"))
    assert_sound(res)
    t = res.touches
    assert not t.duplicated(["thread", "page"]).any(), "a thread touches a page only once"
    assert len(t) == 400 and t["page"].nunique() < 400
    assert t.groupby("page")["thread"].nunique().max() > 1
    # A page faults at most once per thread that found it unmapped; most shared touches
    # find the page already mapped.
    assert t["page"].nunique() <= len(res.faults) < len(t)
    assert set(res.faults["page"]) == set(t["page"])


@pytest.mark.parametrize(("backing", "kind"),
                         [("shmem", "minor"), ("hugetlb", "missing"), ("anon", "missing")])
def test_verification_catches_a_corrupted_page(backing, kind):
    res = run(ExerciseConfig(backing=backing, kind=kind, pages=PAGES[backing], corrupt_page=3))
    assert res.summary["pages_verified"] == PAGES[backing]
    assert res.summary["mismatches"] == 1
    assert res.summary["first_mismatch"] == 3


def _run_in_background(cfg: ExerciseConfig) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target() -> None:
        try:
            out["result"] = run(cfg)
        except UserError as e:
            out["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    return thread, out


def _wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("timed out waiting")


def _workload_tasks(pid: int) -> dict[str, str]:
    """comm -> Cpus_allowed_list of pid's exerciser threads."""
    tasks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            status = (task / "status").read_text()
        except OSError:
            continue
        if comm.startswith("uffdx-"):
            allowed = next(line for line in status.splitlines()
                           if line.startswith("Cpus_allowed_list"))
            tasks[f"{comm}/{task.name}"] = allowed.split()[-1]
    return tasks


def _wait_for_tasks(pid: int, count: int) -> dict[str, str]:
    def enough() -> dict[str, str]:
        tasks = _workload_tasks(pid)
        return tasks if len(tasks) >= count else {}

    return _wait_for(enough)


@pytest.mark.parametrize("handler", ["thread", "process"])
def test_cpu_pinning(handler):
    cfg = ExerciseConfig(pages=64, threads=2, handler_threads=2, handler=handler,
                         policy="prefetch", cpus=[0], delay_s=0.5)
    thread, out = _run_in_background(cfg)
    if handler == "process":
        child = next(iter(_wait_for(lambda: handler_processes(os.getpid()))))
        tasks = _wait_for_tasks(child, 4) | _wait_for_tasks(os.getpid(), 2)
    else:
        tasks = _wait_for_tasks(os.getpid(), 5)
    thread.join(30)
    assert "result" in out, out
    assert_sound(out["result"])
    names = sorted(name.split("/")[0] for name in tasks)
    expected = ["uffdx-handler", "uffdx-handler", "uffdx-prefetch", "uffdx-touch0",
                "uffdx-touch1"]
    assert names == sorted(expected + (["uffdx-hprocess"] if handler == "process" else []))
    assert set(tasks.values()) == {"0"}, tasks


def test_hugepages_raised_for_the_run_and_restored():
    before, free = nr_hugepages(), available_hugepages()
    thread, out = _run_in_background(ExerciseConfig(backing="hugetlb", pages=free + 4,
                                                    delay_s=0.3))
    during = _wait_for(lambda: nr_hugepages() if nr_hugepages() != before else 0)
    thread.join(30)
    assert "result" in out, out
    assert during == before + 4
    assert nr_hugepages() == before


def test_reserved_hugepages_restores_on_exception():
    before = nr_hugepages()
    with pytest.raises(RuntimeError), reserved_hugepages(available_hugepages() + 3):
        assert nr_hugepages() == before + 3
        raise RuntimeError("boom")
    assert nr_hugepages() == before


def test_reserved_hugepages_gives_back_a_dead_runs_pages_not_a_live_ones():
    """The ledger names a run by pid and start time: an entry whose pid now belongs to another
    process (this one) is of a dead run, and its pages go back; this live run's stay."""
    before = nr_hugepages()
    with reserved_hugepages(available_hugepages() + 2):
        NR_HUGEPAGES.write_text(str(before + 5))  # 3 more, added by a run that died ...
        (LEDGER / f"{os.getpid()}-1-0-3").touch()  # ... and whose pid is now this process's
        with reserved_hugepages(1):
            pass
        assert nr_hugepages() == before + 2
    assert nr_hugepages() == before


def test_dead_handler_process_releases_faulting_threads():
    # The handler sleeps 30 s per fault; killing it must free the blocked faulting thread
    # (the uffd is closed) and end the run with a clear error instead of a hang.
    cfg = ExerciseConfig(pages=16, handler="process", fetch_delay_us=30e6)
    start = time.monotonic()
    thread, out = _run_in_background(cfg)
    child = next(iter(_wait_for(lambda: handler_processes(os.getpid()))))
    time.sleep(0.2)
    os.kill(child, 9)
    thread.join(10)
    assert not thread.is_alive(), "run() hung after the handler process died"
    assert "handler process killed by signal 9" in str(out["error"])
    assert time.monotonic() - start < 5


def test_hung_handler_thread_times_out():
    cfg = ExerciseConfig(pages=16, fetch_delay_us=30e6, stall_timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(UserError, match="faults not resolved in time"):
        run(cfg)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"policy": "fastest"}, "unknown policy 'fastest'"),
        ({"backing": "tmpfs"}, "unknown backing"),
        ({"pages": 0}, "pages must be an integer"),
        ({"pages": 4, "threads": 8}, "4 pages cannot be shared by 8 threads"),
        ({"write_fraction": 1.5}, "write fraction must be between 0 and 1"),
        ({"kind": "minor", "misuse": "continue-on-missing"}, "needs kind missing"),
        ({"misuse": "copy-on-minor", "policy": "prefetch"}, "cannot run with policy prefetch"),
        ({"stale_fraction": 0.5}, "applies to policy copy only"),
        ({"cpus": [4096]}, "CPU 4096 is not available"),
        ({"pages": 1 << 30}, "beyond the memory available"),
        ({"backing": "hugetlb", "pages": 1 << 20}, "MiB is available"),
        ({"backing": "anon", "kind": "minor"}, "backing anon supports kind missing only"),
        ({"backing": "hugetlb", "kind": "missing", "zeropage_fraction": 0.5},
         "hugetlb has no UFFDIO_ZEROPAGE"),
        ({"backing": "anon", "policy": "copy"}, "policy copy .* needs kind minor"),
        ({"continue_twice": True, "kind": "missing"}, "continue twice .* needs kind minor"),
        ({"continue_twice": True, "backing": "anon"}, "continue twice .* needs kind minor"),
        ({"continue_twice": True, "policy": "batch"}, "policy continue or copy"),
        ({"continue_twice": True, "policy": "prefetch"}, "policy continue or copy"),
        ({"thread_id": False, "pattern": "zipf", "threads": 2}, "without thread ids"),
        ({"thread_id": 0}, "thread id must be True or False"),
        ({"reuse_fd": "yes"}, "reuse fd must be True or False"),
    ],
)
def test_bad_config_is_one_clear_line(changes, message):
    with pytest.raises(UserError, match=message) as info:
        run(ExerciseConfig(**changes))
    assert "\n" not in str(info.value)


# --- handlers as others write them: no thread ids, CONTINUE twice, fd reuse, anon memory ---


@pytest.mark.parametrize(("backing", "handler"),
                         [("shmem", "thread"), ("shmem", "process"), ("hugetlb", "process")])
def test_no_thread_id_faults_still_known_by_thread(backing, handler):
    """Without UFFD_FEATURE_THREAD_ID every message's ptid is 0; each fault is still joined to
    the thread whose touch made it, and its timing is that touch's."""
    pages = PAGES[backing]
    res = run(ExerciseConfig(backing=backing, pages=pages, threads=4 if pages >= 4 else 1,
                             handler_threads=2, handler=handler, pattern="random",
                             write_fraction=0.5, thread_id=False))
    assert_sound(res)
    f, t = res.faults, res.touches
    assert res.summary["thread_id"] is False
    assert (f["ptid"] == 0).all(), "the kernel sent thread ids that were not asked for"
    assert res.summary["faults"] == len(f) == pages and sorted(f["page"]) == list(range(pages))
    assert f[["tid", "thread", "start_ns", "end_ns"]].notna().all().all()
    joined = f.merge(t, on="page", suffixes=("", "_t"), validate="one_to_one")
    assert (joined["tid"] == joined["tid_t"]).all() and (joined["thread"] == joined["thread_t"]).all()
    assert (joined["start_ns"] == joined["start_ns_t"]).all()
    # The message belongs to that touch: read while it was blocked, with its access kind.
    assert ((f["start_ns"] < f["msg_ns"]) & (f["msg_ns"] < f["end_ns"])).all()
    assert (f["write"] == ((f["flags"] & FLAG_WRITE) != 0)).all()
    assert f["tid"].nunique() == t["tid"].nunique() == res.config.threads
    assert (res.ops["errno"] == 0).all() and len(res.ops) == pages


@pytest.mark.parametrize(("backing", "policy", "handler"),
                         [("shmem", "continue", "thread"), ("hugetlb", "continue", "process"),
                          ("shmem", "copy", "process")])
def test_continue_twice_records_both_ioctls(backing, policy, handler):
    pages = PAGES[backing]
    res = run(ExerciseConfig(backing=backing, pages=pages, policy=policy, handler=handler,
                             stale_fraction=0.5 if policy == "copy" else 0.0,
                             continue_twice=True))
    assert_sound(res)
    ops = res.ops
    assert set(ops["op"]) == {"continue"} and len(ops) == 2 * pages == 2 * len(res.faults)
    first, again = ops[ops["role"] == "resolve"], ops[ops["role"] == "repeat"]
    assert len(first) == len(again) == pages
    assert (first["errno"] == 0).all() and (first["mapped"] == res.page_size).all()
    assert (again["errno"] == errno.EEXIST).all() and (again["mapped"] == -errno.EEXIST).all()
    assert (ops.groupby("addr").size() == 2).all()
    pair = first.merge(again, on="addr", suffixes=("", "_again"), validate="one_to_one")
    assert (pair["end_ns"] <= pair["start_ns_again"]).all()
    assert (pair["handler_tid"] == pair["handler_tid_again"]).all()
    assert (pair["len"] == pair["len_again"]).all()
    s = res.summary
    assert s["repeats"] == s["repeats_eexist"] == pages
    assert s["errors_by_errno"] == {"EEXIST": pages} and s["ioctls"] == {"continue": 2 * pages}


def test_continue_twice_repeats_only_what_it_mapped():
    """Several threads fault on shared pages: a message whose CONTINUE found the page already
    mapped is answered by EEXIST + WAKE, with no repeat; each successful CONTINUE has one."""
    res = run(ExerciseConfig(pages=400, threads=4, handler_threads=2, pattern="zipf",
                             continue_twice=True))
    assert_sound(res)
    ops = res.ops
    conts = ops[ops["op"] == "continue"]
    mapped = conts[(conts["role"] == "resolve") & (conts["errno"] == 0)]
    lost = conts[(conts["role"] == "resolve") & (conts["errno"] == errno.EEXIST)]
    again = conts[conts["role"] == "repeat"]
    assert len(mapped) == res.touches["page"].nunique() == len(again)
    assert sorted(mapped["addr"]) == sorted(again["addr"])
    assert len(mapped) + len(lost) == len(res.faults)
    assert (again["errno"] == errno.EEXIST).all()
    assert (ops["role"] == "eexist-wake").sum() == len(lost)


def _uffd_fds(pid: int) -> list[int]:
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == "anon_inode:[userfaultfd]":
                found.append(int(fd.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("handler", ["thread", "process"])
def test_reuse_fd_reopens_the_uffd_number(handler):
    """At the end the holder of the uffd closes it, gets /proc/meminfo at the same number and
    reads it; the number is the one /proc showed for the uffd during the run."""
    thread, out = _run_in_background(ExerciseConfig(pages=64, handler=handler, reuse_fd=True,
                                                    delay_s=0.3))
    holder = (next(iter(_wait_for(lambda: handler_processes(os.getpid()))))
              if handler == "process" else os.getpid())
    uffd = _wait_for(lambda: _uffd_fds(holder))
    thread.join(30)
    assert "result" in out, out
    res = out["result"]
    assert_sound(res)
    s = res.summary
    assert len(uffd) == 1 and s["reuse_fd_number"] == uffd[0]
    assert s["reuse_fd_pid"] == res.handler_pid == holder
    assert s["reuse_fd_verified"] is True
    assert s["reuse_fd_reads"] == 10 and s["reuse_fd_bytes"] > 10 * 100
    # After every fault was resolved and before the run returned.
    assert s["reuse_fd_start_ns"] > res.touches["end_ns"].max()
    assert s["reuse_fd_start_ns"] < s["reuse_fd_end_ns"] < time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    if handler == "process":
        assert s["reuse_fd_moved"] is False  # open() took the lowest free number: the uffd's
    assert not _uffd_fds(os.getpid())


def test_reuse_fd_moves_the_file_onto_the_number():
    """A lower fd freed during the run: open() lands there, and the file is moved onto the
    uffd's number (F_DUPFD_CLOEXEC), leaving the lower one free again."""
    hole = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        thread, out = _run_in_background(ExerciseConfig(pages=32, reuse_fd=True, delay_s=0.3))
        uffd = _wait_for(lambda: _uffd_fds(os.getpid()))
    finally:
        os.close(hole)
    thread.join(30)
    assert "result" in out, out
    s = out["result"].summary
    assert hole < uffd[0] == s["reuse_fd_number"]
    assert s["reuse_fd_moved"] is True and s["reuse_fd_verified"] is True
    assert s["reuse_fd_reads"] == 10


@pytest.mark.parametrize("handler", ["thread", "process"])
def test_anon_missing_copy_and_zeropage(handler):
    """Private anonymous memory, no second mapping: missing faults, each page resolved by one
    COPY (from a private buffer holding its bytes) or ZEROPAGE, and every page verified."""
    pages = PAGES["anon"]
    res = run(ExerciseConfig(backing="anon", pages=pages, threads=2, handler=handler,
                             write_fraction=0.5, zeropage_fraction=0.3, pattern="random"))
    assert_sound(res)  # the verifier expects the COPY bytes, and zeros after ZEROPAGE
    f, ops = res.faults, res.ops
    assert res.summary["kind"] == "missing" and res.summary["backing"] == "anon"
    assert res.page_size == os.sysconf("SC_PAGE_SIZE")
    assert sorted(f["page"]) == list(range(pages)) and ((f["flags"] & FLAG_MINOR) == 0).all()
    assert (f["write"] == ((f["flags"] & FLAG_WRITE) != 0)).all()
    assert (ops["role"] == "resolve").all() and (ops["errno"] == 0).all()
    assert (ops["mapped"] == res.page_size).all()
    counts = ops["op"].value_counts().to_dict()
    assert counts["copy"] > 0 and counts["zeropage"] > 0
    assert counts["copy"] + counts["zeropage"] == pages == ops["addr"].nunique()
    assert res.summary["ioctls"] == counts


def test_anon_corruption_is_caught_where_zeropage_was_used():
    # ZEROPAGE'd pages must read as zeros: a damaged one is a mismatch like any other.
    res = run(ExerciseConfig(backing="anon", pages=64, zeropage_fraction=1.0, corrupt_page=5))
    assert set(res.ops["op"]) == {"zeropage"}
    assert res.summary["mismatches"] == 1 and res.summary["first_mismatch"] == 5


def test_all_new_options_at_once_on_hugetlb():
    """The options compose, and the hugepages are still given back (no_leaks)."""
    res = run(ExerciseConfig(backing="hugetlb", pages=4, handler="process", thread_id=False,
                             continue_twice=True, reuse_fd=True))
    assert_sound(res)
    s = res.summary
    assert s["faults"] == 4 and s["repeats_eexist"] == 4 and s["ioctls"] == {"continue": 8}
    assert (res.faults["ptid"] == 0).all() and s["reuse_fd_verified"] is True
    assert s["reuse_fd_pid"] == res.handler_pid != res.pid
