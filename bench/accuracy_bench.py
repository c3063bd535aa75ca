"""How closely each fault's recorded stall matches the exerciser's own timing of the touch, out
to p99, next to a witness of how much time the host takes from this virtual CPU.

The touch is timed in user space, the stall in the kernel: the exception entry and exit
around the fault are in one and not the other (`entry_...`, `exit_...` columns). On a VM the
host also takes time there that no guest tracepoint can see, so the p99 target (5 % or 2 µs)
depends on the host as much as on the tracer; `make test` asserts p50 (overall and per path)
and the kernel interval inside every touch, this bench measures p99. The witness times plain
1 µs user-mode windows on the same CPU, before and after each run: the share that took more
than 1 µs longer.
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.exerciser_bench import build_c
from bench.tracer_bench import UFFDTRACE
from uffdtrace.exerciser.compare import match_faults

WITNESS_SOURCE = Path(__file__).with_name("host_noise.c")
CPU = 0
PAGES = {"shmem": 3000, "hugetlb": 1000}
WITNESS_WINDOWS, WITNESS_WIDTH_NS = 200_000, 1000


def host_noise(witness: Path) -> float:
    """Share of plain 1 µs windows on CPU 0 that took more than 1 µs longer."""
    out = subprocess.run([str(witness), str(WITNESS_WINDOWS), str(WITNESS_WIDTH_NS), str(CPU)],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    return result["over_1us"] / result["windows"]


def traced_faults(workdir: Path, backing: str, mode: str) -> pd.DataFrame:
    """One `record` around one pinned 1 + 1 thread CONTINUE workload, matched fault by fault."""
    truth, recording = workdir / "truth.csv", workdir / "faults.csv"
    summary = workdir / "workload.json"
    workload = [*UFFDTRACE, "exercise", "--backing", backing, "--pages", str(PAGES[backing]),
                "--cpus", str(CPU), "--csv", str(truth), "--json"]
    subprocess.run([*UFFDTRACE, "record", "--mode", mode, "-o", str(recording), "--",
                    "sh", "-c", f"{shlex.join(workload)} > {summary}"],
                   capture_output=True, text=True, check=True)
    page_size = json.loads(summary.read_text())["page_size"]
    return match_faults(pd.read_csv(recording), pd.read_csv(truth), page_size)


def run_row(faults: pd.DataFrame, noise: float) -> dict[str, float]:
    gap_us = (faults["touch_ns"] - faults["stall_ns"]) / 1000
    p50, p90, p99 = np.percentile(gap_us, [50, 90, 99])
    return {
        "gap_p50_us": p50, "gap_p90_us": p90, "gap_p99_us": p99,
        "error_p99": float(np.percentile(faults["error"], 99)),
        "beyond_pct": 100 * float((faults["error"] > 1).mean()),
        "entry_over_2us_pct": 100 * float((faults["entry_ns"] > 2000).mean()),
        "exit_over_2us_pct": 100 * float((faults["exit_ns"] > 2000).mean()),
        "exit_over_50us_pct": 100 * float((faults["exit_ns"] > 50_000).mean()),
        "host_noise_pct": 100 * noise,
    }


def rows(runs: int = 5) -> list[dict[str, Any]]:
    """Per backing and mode, medians over `runs`; `runs_within` counts runs meeting p99."""
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        witness = build_c(WITNESS_SOURCE, Path(tmp))
        for backing in PAGES:
            for mode in ("light", "full"):
                samples = []
                for i in range(runs):
                    workdir = Path(tmp) / f"{backing}-{mode}-{i}"
                    workdir.mkdir()
                    before = host_noise(witness)
                    faults = traced_faults(workdir, backing, mode)
                    samples.append(run_row(faults, (before + host_noise(witness)) / 2))
                row: dict[str, Any] = {"name": f"{backing}, record --mode {mode}", "runs": runs,
                                       "runs_within": sum(s["error_p99"] <= 1 for s in samples)}
                for key in samples[0]:
                    row[key] = statistics.median(s[key] for s in samples)
                table.append(row)
    return table
