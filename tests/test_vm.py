"""The kprobe and fentry backends on Debian's distro kernel (6.1), in a VM under qemu TCG.

`make vmtest` runs only these (`pytest -m vm`); `make test` runs them with the rest. One VM boot
runs every session of tests/vm/scenarios.py (see tests/vm/harness.py); the tests below judge the
files it leaves. Latencies are never judged: TCG is 10-50x slower than the host. A missing
kernel image, qemu or vng fails every test with one message (VMError), never a skip.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.vm.harness import VMError, guest_kernel, run_in_vm
from tests.vm.scenarios import BY_NAME, EMPTY, FILLED, HIDDEN, MISUSE_ERRNO, SESSIONS, WORKLOADS
from uffdtrace.events import FAULT_COLUMNS
from uffdtrace.probes import hooks

VM_TIMEOUT_S = 840  # the VM is killed after this (measured: see README, "Tests")

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.root]
by_session = pytest.mark.parametrize("name", [s.name for s in SESSIONS])
PAIRS = [(s.name, w) for s in SESSIONS for w in s.workloads]


@pytest.fixture(scope="session")
def vm_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Boot once, run every session, return the directory the guest wrote."""
    return run_in_vm(tmp_path_factory.mktemp("vm"), [s.scenario() for s in SESSIONS], VM_TIMEOUT_S,
                     echo=sys.stderr)


@dataclass(frozen=True)
class Run:
    """One workload of one traced session: record's summary and rows, and the ground truth."""

    summary: dict[str, Any]
    rec: pd.DataFrame  # the rows of this workload's threads
    truth: dict[str, Any]
    gt: pd.DataFrame


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@functools.cache
def session(outdir: Path, name: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """A session's summary and CSV; a failed `record` fails with its stderr's tail."""
    d = outdir / name
    rc = (d / "returncode").read_text().strip()
    assert rc == "0", f"{name}: record exit {rc}; stderr tail:\n{_tail(d / 'stderr.txt')}"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["command_exit"] == 0, f"{name}: a workload failed:\n{_tail(d / 'stderr.txt')}"
    return summary, pd.read_csv(d / "rec.csv")


def workload(outdir: Path, name: str, wl: str) -> Run:
    summary, rec = session(outdir, name)
    gt = pd.read_csv(outdir / name / f"{wl}.csv")
    truth = json.loads((outdir / name / f"{wl}.json").read_text())
    return Run(summary, rec[rec["tid"].isin(gt["tid"])], truth, gt)


def pages(rows: pd.DataFrame, page_size: int, base: int) -> set[int]:
    """Faulted pages as offsets into the workload's mapping (addresses differ run to run)."""
    return set(((rows["addr"] - base) // page_size).tolist())


# ---- The VM itself -------------------------------------------------------------------------

def test_guest_runs_the_distro_kernel_with_kprobes_and_fentry(vm_out: Path) -> None:
    doctor = json.loads((vm_out / "doctor.json").read_text())
    assert doctor["kernel"] == guest_kernel()[0] != os.uname().release
    checks = {c["name"]: c for c in doctor["checks"]}
    for name in ("kprobes", "fentry", "hook:fault", "hook:ioctl", "hook:continue"):
        assert checks[name]["ok"], checks[name]
    assert doctor["verdict"]["auto"] == "fentry", doctor["verdict"]
    assert set(doctor["verdict"]["backends"]["kprobe"]["modes"]) == {"light", "full"}


def test_no_vm_left_running(vm_out: Path) -> None:
    assert (vm_out / "done").exists()
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline")
                if str(vm_out).encode() in _read(p)]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def test_timeout_kills_the_whole_vm(tmp_path: Path) -> None:
    outdir = tmp_path / "slow"
    with pytest.raises(VMError, match="timed out after 20 s"):
        run_in_vm(outdir, [], timeout_s=20)
    assert "Linux version" in (outdir / "console.log").read_text(errors="replace"), "qemu never ran"
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline") if str(outdir).encode() in _read(p)]


# ---- Every session -------------------------------------------------------------------------

@by_session
def test_session_ran_its_backend_without_loss(vm_out: Path, name: str) -> None:
    summary, rec = session(vm_out, name)
    assert (summary["backend"], summary["mode"]) == (BY_NAME[name].reported, BY_NAME[name].mode)
    assert summary["lost_total"] == 0, summary["lost"]
    assert list(rec.columns) == list(FAULT_COLUMNS)


@by_session
def test_hooks_attached_as_the_backend_says(vm_out: Path, name: str) -> None:
    summary, _ = session(vm_out, name)
    attached = summary["hooks"]
    if BY_NAME[name].reported == "tracepoint":
        assert attached == {}
        return
    assert set(attached) == {h.name for h in hooks.HOOKS}
    how = {v.split(":")[0] for v in attached.values() if v}
    if BY_NAME[name].reported == "kprobe":
        assert how == {"kprobe"}, attached
    else:  # fentry, with kprobes for functions with more arguments than a trampoline takes
        assert attached["fault"] == "fentry:handle_userfault"
        assert attached["hugetlb-install"] == "kprobe:hugetlb_mcopy_atomic_pte"  # 8 arguments on 6.1


# ---- Every workload of every session -------------------------------------------------------

@pytest.mark.parametrize(("name", "wl"), PAIRS)
def test_every_fault_recorded_once(vm_out: Path, name: str, wl: str) -> None:
    r = workload(vm_out, name, wl)
    assert r.truth["mismatches"] == 0 and r.truth["pages_verified"] == WORKLOADS[wl].pages
    kinds = r.rec["kind"].value_counts(dropna=False).to_dict()
    minor = r.rec[r.rec["kind"] == "minor"]
    assert len(minor) == len(r.rec) == r.truth["faults"], kinds
    page = r.truth["page_size"]
    assert set(zip(minor["tid"], minor["addr"] // page, strict=True)) == set(
        zip(r.gt["tid"], r.gt["addr"] // page, strict=True))
    assert (minor["backing"] == WORKLOADS[wl].backing).all()
    assert (minor["page_size"] == page).all()
    assert set(minor["handler_pid"].dropna().astype(int)) == {r.truth["handler_pid"]}


@pytest.mark.parametrize(("name", "wl"), [p for p in PAIRS if BY_NAME[p[0]].name != "kprobe-fallbacks"])
def test_columns_of_the_backend_and_mode(vm_out: Path, name: str, wl: str) -> None:
    r = workload(vm_out, name, wl)
    key = (BY_NAME[name].reported, BY_NAME[name].mode)
    resolved = r.rec[r.rec["outcome"] == "resolved"]
    assert len(resolved) > 0.8 * len(r.rec)
    for column in FILLED[key]:
        assert resolved[column].notna().all(), column
    for column in EMPTY[key]:
        assert r.rec[column].isna().all(), column
    if "resolver" in FILLED[key]:
        assert set(resolved["resolver"]) == {"CONTINUE"}
        assert (resolved["mapped"] == r.truth["page_size"]).all()
    if "install_ns" in FILLED[key]:  # the PTE install is a part of the ioctl's own work
        assert (resolved["install_ns"] <= resolved["mfill_ns"]).all()
        assert (resolved["mfill_ns"] <= resolved["continue_ns"]).all()


@pytest.mark.parametrize("name", [s.name for s in SESSIONS if "misuse" in s.workloads])
def test_misuse_errno_recorded(vm_out: Path, name: str) -> None:
    r = workload(vm_out, name, "misuse")
    assert r.truth["misuse_errno"] == MISUSE_ERRNO
    if "errno" in FILLED[(BY_NAME[name].reported, BY_NAME[name].mode)]:
        # A fault's errno is its resolving ioctl's; the failed COPY before it is an ioctl of
        # its own (the session's only failures: one per fault of this workload).
        assert (r.rec["errno"] == 0).all(), r.rec["errno"].value_counts(dropna=False)
        failed = {(i["ioctl"], i["errno"]): i["count"] for i in r.summary["ioctls"] if i["errno"]}
        assert failed == {("COPY", MISUSE_ERRNO): len(r.rec)}
    else:
        assert r.rec["errno"].isna().all()


# ---- Fallbacks: symbols pretended absent ----------------------------------------------------

def test_fallbacks_when_symbols_are_absent(vm_out: Path) -> None:
    summary, _ = session(vm_out, "kprobe-fallbacks")
    attached = summary["hooks"]
    assert attached["shmem-fault"] == "kprobe:shmem_get_folio_gfp"  # the second candidate
    assert attached["hugetlb-fault"] is None and attached["continue"] is None
    assert not set(HIDDEN) & {v.split(":")[1] for v in attached.values() if v}
    hugetlb = workload(vm_out, "kprobe-fallbacks", "hugetlb").rec
    assert (hugetlb["backing"] == "hugetlb").all()  # from the resolver's PTE install
    assert hugetlb["mfill_ns"].isna().all() and hugetlb["install_ns"].notna().all()
    doctor = {c["name"]: c for c in json.loads((vm_out / "doctor.json").read_text())["checks"]}
    assert doctor["hook:hugetlb-fault"]["ok"], "the doctor run hides nothing"


# ---- Cross-check: the same scenarios through different backends ----------------------------

CROSS = ("shmem", "hugetlb-4t-process", "misuse")


@pytest.mark.parametrize("wl", CROSS)
@pytest.mark.parametrize("other", ["tracepoint-full", "auto-light", "kprobe-full"])
def test_backends_agree_in_the_vm(vm_out: Path, wl: str, other: str) -> None:
    a, b = workload(vm_out, "kprobe-light", wl), workload(vm_out, other, wl)
    page = a.truth["page_size"]
    assert len(a.rec) == len(b.rec) == a.truth["faults"] == b.truth["faults"]
    assert pages(a.rec, page, a.gt["addr"].min()) == pages(b.rec, page, b.gt["addr"].min())


@pytest.fixture(scope="module")
def host_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cross-check's workloads traced on this host, with the tracepoint backend."""
    out = tmp_path_factory.mktemp("host")
    cmd = [sys.executable, "-m", "uffdtrace", "record", "--backend", "tracepoint", "--mode", "light",
           "-o", str(out / "rec.csv"), "--json", "--", sys.executable, "-m", "tests.vm.workloads",
           str(out), *(f"{w}={' '.join(WORKLOADS[w].args)}" for w in CROSS)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (out / "summary.json").write_text(res.stdout)
    (out / "returncode").write_text("0\n")
    return out


@pytest.mark.parametrize("wl", CROSS)
def test_host_tracepoint_and_vm_kprobe_agree(vm_out: Path, host_run: Path, wl: str) -> None:
    vm = workload(vm_out, "kprobe-light", wl)
    host = workload(host_run.parent, host_run.name, wl)
    page = vm.truth["page_size"]
    assert host.truth["page_size"] == page
    assert len(host.rec) == len(vm.rec) == host.truth["faults"] == vm.truth["faults"]
    assert pages(host.rec, page, host.gt["addr"].min()) == pages(vm.rec, page, vm.gt["addr"].min())
    assert set(vm.rec["backing"]) == {WORKLOADS[wl].backing}
    # The tracepoint backend samples a region's path only when a fault there notified its
    # handler or slept (README, known limits); a fault resolved before either stays unclassified.
    unclassified = host.rec["backing"].isna()
    assert set(host.rec.loc[~unclassified, "backing"]) == {WORKLOADS[wl].backing}
    assert host.rec.loc[unclassified, "block_ns"].isna().all()
    assert unclassified.sum() <= len(host.rec) // 10
