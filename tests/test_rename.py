"""Names and address spaces that change under a traced thread (tests/rename.c): BPF takes a
thread's comm and mm at its first fault only, so renames (prctl, another thread writing its
/proc comm file) and exec must reach its state, or later rows carry the old name and the
old address space (then no message matches the fault: msg_ns is empty)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import build_c

pytestmark = [pytest.mark.root]

UFFDTRACE = [sys.executable, "-m", "uffdtrace"]
NAME = "uffdx-rename"


@pytest.fixture(scope="module")
def renamer(tmp_path_factory) -> Path:
    return build_c(tmp_path_factory, "rename.c", NAME)


@pytest.mark.parametrize("mode", ["light", "full"])
def test_rows_follow_renames_and_exec(tmp_path, renamer, mode):
    csv = tmp_path / "faults.csv"
    out = subprocess.run([*UFFDTRACE, "record", "--mode", mode, "-o", str(csv), "--", str(renamer)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = pd.read_csv(csv).sort_values("fault_ns")
    assert rows["comm"].tolist() == ["rn-first", "rn-second", "rn-third", "rn-leader", NAME]
    assert (rows["outcome"] == "resolved").all(), rows
    assert rows["msg_ns"].notna().all(), rows[["comm", "msg_ns"]]  # each message matched its fault
    leader = rows[rows["tid"] == rows["pid"]]
    assert leader["comm"].tolist() == ["rn-leader", NAME]  # one thread, before and after exec
