"""The tracer on Debian's distro kernel (6.1, which has kprobes), in a VM under qemu TCG.

`make vmtest` (= pytest -m vm). One VM boot runs every scenario of tests/vm/scenarios.py (see
tests/vm/harness.py); the tests below judge the files it leaves. Latencies are never judged:
TCG is 10-50x slower than the host. A missing kernel image, qemu or vng fails every test with
one message (VMError), never a skip.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.vm.harness import VMError, guest_kernel, run_in_vm
from tests.vm.scenarios import BACKENDS, CASES, Case
from uffdtrace.events import FAULT_COLUMNS

VM_TIMEOUT_S = 720  # measured about 6 min on the 2-core host; the VM is killed after this

vm = pytest.mark.vm
by_case = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)


@pytest.fixture(scope="session")
def vm_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Boot once, run every scenario, return the directory the guest wrote."""
    return run_in_vm(tmp_path_factory.mktemp("vm"), [c.scenario() for c in CASES], VM_TIMEOUT_S)


@dataclass(frozen=True)
class Traced:
    """One scenario's outcome: record's JSON summary, the exerciser's, and the recorded CSV."""

    summary: dict[str, Any]
    truth: dict[str, Any]
    rec: pd.DataFrame


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@functools.cache
def _traced(outdir: Path, name: str) -> Traced:
    """Load a scenario's files; a failed `record` fails with its stderr's tail, once per test."""
    d = outdir / name
    rc = (d / "returncode").read_text().strip()
    assert rc == "0", f"{name}: record exit {rc}; stderr tail:\n{_tail(d / 'stderr.txt')}"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["command_exit"] == 0, f"{name}: exerciser failed:\n{_tail(d / 'stderr.txt')}"
    return Traced(summary, json.loads((d / "gt.json").read_text()), pd.read_csv(d / "rec.csv"))


def traced(outdir: Path, case: Case) -> Traced:
    return _traced(outdir, case.name)


def vm_processes(outdir: Path) -> list[str]:
    """Live processes whose command line names `outdir`: vng, virtme-run and qemu do."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()  # empty for zombies
        except OSError:
            continue
        if str(outdir).encode() in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace")[:200])
    return found


# ---- The VM itself -------------------------------------------------------------------------

@vm
def test_guest_runs_the_distro_kernel_with_kprobes(vm_out: Path) -> None:
    doctor = json.loads((vm_out / "doctor.json").read_text())
    assert doctor["kernel"] == guest_kernel()[0] != os.uname().release
    checks = {c["name"]: c for c in doctor["checks"]}
    assert checks["kprobes"]["ok"], checks["kprobes"]
    assert doctor["verdict"]["tracing_possible"], doctor["verdict"]


@vm
def test_no_vm_left_running(vm_out: Path) -> None:
    assert (vm_out / "done").exists()
    assert vm_processes(vm_out) == []


@vm
def test_timeout_kills_the_whole_vm(tmp_path: Path) -> None:
    outdir = tmp_path / "slow"
    with pytest.raises(VMError, match="timed out after 20 s"):
        run_in_vm(outdir, [], timeout_s=20)
    assert "Linux version" in (outdir / "console.log").read_text(errors="replace"), "qemu never ran"
    assert vm_processes(outdir) == []


# ---- Each scenario (rows of tests/vm/scenarios.py) -------------------------------------------

@vm
@by_case
def test_record_and_workload_succeed(vm_out: Path, case: Case) -> None:
    t = traced(vm_out, case)
    assert t.truth["mismatches"] == 0 and t.truth["pages_verified"] == case.pages
    assert list(t.rec.columns) == list(FAULT_COLUMNS)
    assert (t.summary["backend"], t.summary["mode"]) == (BACKENDS[case.backend].reported, case.mode)


@vm
@by_case
def test_no_event_lost(vm_out: Path, case: Case) -> None:
    t = traced(vm_out, case)
    assert t.summary["lost_total"] == 0, t.summary["lost"]


@vm
@by_case
def test_every_fault_recorded_once(vm_out: Path, case: Case) -> None:
    t = traced(vm_out, case)
    minor = t.rec[t.rec["kind"] == "minor"]
    assert len(minor) == len(t.rec) == t.truth["faults"] == t.summary["faults"], t.summary["by_backing_kind"]
    assert set(zip(minor["tid"], minor["addr"] // t.truth["page_size"], strict=True)) == {
        (tid, addr // t.truth["page_size"])
        for tid, addr in pd.read_csv(vm_out / case.name / "gt.csv")[["tid", "addr"]].itertuples(index=False)
    }
    assert (minor["backing"] == case.backing).all()
    assert (minor["page_size"] == t.truth["page_size"]).all()
    assert set(t.rec["pid"]) == {t.truth["pid"]}


@vm
@by_case
def test_faults_resolved_by_the_handler(vm_out: Path, case: Case) -> None:
    t = traced(vm_out, case)
    assert set(t.rec["outcome"]) <= {"resolved", "no_wait"}
    handlers = set(t.rec["handler_pid"].dropna().astype(int))
    assert handlers == {t.truth["handler_pid"]}
    assert (t.truth["handler_pid"] != t.truth["pid"]) == (case.handler == "process")


@vm
@by_case
def test_columns_of_the_backend_and_mode(vm_out: Path, case: Case) -> None:
    t = traced(vm_out, case)
    backend = BACKENDS[case.backend]
    for column in backend.empty[case.mode]:
        assert t.rec[column].isna().all(), f"{column} set, yet {case.backend}/{case.mode} cannot know it"
    resolved = t.rec[t.rec["outcome"] == "resolved"]
    assert len(resolved) > len(t.rec) // 2
    for column in backend.resolved[case.mode]:
        assert resolved[column].notna().all(), f"{column} missing in resolved faults"


@vm
@pytest.mark.parametrize("case", [c for c in CASES if c.misuse], ids=lambda c: c.name)
def test_misuse_errno_in_records(vm_out: Path, case: Case) -> None:
    t = traced(vm_out, case)
    assert t.truth["misuse_errno"] == case.misuse_errno
    assert (t.rec["errno"] == case.misuse_errno).all()
    assert t.summary["errnos"] == {str(case.misuse_errno): len(t.rec)}


# ---- Harness logic, no VM needed (run by the normal test suite) -----------------------------

def _kernels(root: Path, versions: dict[str, bool]) -> tuple[Path, Path]:
    """/boot and /lib/modules with these kernel images, each with build headers or not."""
    boot, modules = root / "boot", root / "modules"
    boot.mkdir()
    for version, headers in versions.items():
        (boot / f"vmlinuz-{version}").touch()
        (modules / version / ("build" if headers else "kernel")).mkdir(parents=True)
    return boot, modules


def test_guest_kernel_is_the_newest_other_one_with_headers(tmp_path: Path) -> None:
    boot, modules = _kernels(tmp_path, {"6.1.0-9-amd64": True, "6.1.0-56-amd64": True,
                                        "6.5.0-1-amd64": False, "6.18.44-host": True})
    version, image = guest_kernel(boot, modules, running="6.18.44-host")
    assert (version, image) == ("6.1.0-56-amd64", boot / "vmlinuz-6.1.0-56-amd64")


def test_no_guest_kernel_is_one_clear_error(tmp_path: Path) -> None:
    boot, modules = _kernels(tmp_path, {"6.5.0-1-amd64": False, "6.18.44-host": True})
    with pytest.raises(VMError, match=r"no guest kernel: .*running 6\.18\.44-host.*make setup"):
        guest_kernel(boot, modules, running="6.18.44-host")
