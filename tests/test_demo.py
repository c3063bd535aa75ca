"""`uffdtrace demo` without a terminal: the migration scenario, traced headless."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.root, pytest.mark.netns]


def test_demo_headless_traces_the_migration():
    out = subprocess.run([sys.executable, "-m", "uffdtrace", "demo"], capture_output=True,
                         text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert any("post-copy migration" in line for line in lines), out.stderr
    assert any("recording headless" in line for line in lines)
    faults_line = next(line for line in lines if line.endswith("full mode)") and "faults" in line)
    assert int(faults_line.split()[0]) > 0
    assert any("shmem minor" in " ".join(line.split()) for line in lines), out.stderr
    assert "lost events: 0" in out.stderr
