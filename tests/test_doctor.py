"""`uffdtrace doctor`, run for real on this machine (as root and as nobody) and on edited
findings."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from uffdtrace.commands import doctor
from uffdtrace.probes import capabilities as cap

pytestmark = [pytest.mark.root]

REPO = Path(__file__).resolve().parents[1]


def uffdtrace(*args: str, prefix: tuple[str, ...] = (), **env: str) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh interpreter."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "uffdtrace", *args],
        capture_output=True, text=True, timeout=60, cwd="/",
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", **env},
    )


@pytest.mark.hugepages
def test_doctor_here() -> None:
    res = uffdtrace("doctor", PYTHONIOENCODING="utf-8")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr == ""  # libbcc's complaints are captured into the report
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"uffdtrace doctor: kernel {os.uname().release}")

    def line(name: str) -> str:
        return next(x for x in lines if x.strip().startswith(("✓ " + name, "✗ " + name)))

    assert line("kprobes").lstrip().startswith("✗")
    assert "fix: kprobes need a kernel with CONFIG_KPROBES" in res.stdout
    for name in ("raw-tracepoints", "ringbuf", "stack-traces", "shmem-minor", "hugetlb-minor",
                 "exceptions:page_fault_user", "handle_userfault"):
        assert line(name).lstrip().startswith("✓"), name
    assert "`auto` uses the tracepoint backend, modes light" in res.stdout
    assert "the kprobe backend is unavailable (missing kprobes)" in res.stdout
    assert len(lines) <= 60  # one screen


def test_doctor_without_utf8_says_ok_and_missing() -> None:
    res = uffdtrace("doctor", PYTHONIOENCODING="ascii")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "✓" not in res.stdout and "✗" not in res.stdout
    assert any(x.strip().startswith("MISSING kprobes") for x in res.stdout.splitlines())
    assert any(x.strip().startswith("OK      raw-tracepoints") for x in res.stdout.splitlines())


@pytest.mark.hugepages
def test_doctor_json() -> None:
    res = uffdtrace("doctor", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["kernel"] == os.uname().release and report["root"] is True
    assert not checks["kprobes"]["ok"] and "CONFIG_KPROBES" in checks["kprobes"]["fix"]
    for name in ("raw-tracepoints", "shmem-minor", "hugetlb-minor", *cap.TRACEPOINTS):
        assert checks[name]["ok"], checks[name]
    assert report["symbols"]["handle_userfault"].startswith("0xffffffff")
    verdict = report["verdict"]
    assert verdict["tracing_possible"] and verdict["auto"] == "tracepoint"
    assert verdict["reason"] is None
    assert verdict["backends"]["tracepoint"]["modes"] == ["light", "full"]
    assert verdict["backends"]["kprobe"]["missing"]["light"] == ["kprobes"]


def test_doctor_as_nobody_says_tracing_is_impossible() -> None:
    nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    res = uffdtrace("doctor", prefix=nobody, PYTHONIOENCODING="utf-8")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert "✗ root" in res.stdout
    verdict = res.stdout[res.stdout.index("Verdict:"):]
    assert "tracing is impossible here: root missing (uid 65534)" in verdict
    assert "fix: run as root" in verdict


def test_doctor_exit_status_follows_the_verdict(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = cap.detect()
    lost = dataclasses.replace(real.check("bcc"), ok=False, fix=cap.FIX_BCC,
                               detail="cannot import bcc (No module named 'bcc')")
    no_bcc = dataclasses.replace(real, checks=tuple(
        lost if c.name == "bcc" else c for c in real.checks))
    monkeypatch.setattr(cap, "detect", lambda: no_bcc)
    assert doctor.run(argparse.Namespace(json=False)) == 1
    out = capsys.readouterr().out
    assert "tracing is impossible here: bcc missing (cannot import bcc" in out
    assert "apt-get install python3-bpfcc" in out

    assert doctor.run(argparse.Namespace(json=True)) == 1
    verdict = json.loads(capsys.readouterr().out)["verdict"]
    assert not verdict["tracing_possible"] and verdict["auto"] is None
    assert verdict["reason"].startswith("tracing is impossible here: bcc missing")


def test_doctor_without_bcc_says_so(tmp_path: Path) -> None:
    """With no importable bcc (a directory named bcc/ without a module shadows Debian's),
    doctor still runs and names what is missing: commands are imported only when they run."""
    (tmp_path / "bcc").mkdir()
    (tmp_path / "bcc" / "__init__.py").write_text("raise ImportError('no bcc here')\n")
    res = uffdtrace("doctor", PYTHONPATH=f"{tmp_path}:{REPO}")
    assert res.returncode != 0 and "Traceback" not in res.stdout + res.stderr
    assert "tracing is impossible here: bcc missing (cannot import bcc" in res.stdout
    assert cap.FIX_BCC.split(",")[0] in res.stdout
    for command in ("exercise", "report", "plugins"):  # none of these needs bcc
        assert uffdtrace(command, "--help", PYTHONPATH=f"{tmp_path}:{REPO}").returncode == 0, command
