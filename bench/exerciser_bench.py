"""The exerciser's own round trip against the simplest possible userfaultfd loop.

Both run 1 faulting thread + 1 handler thread on shmem minor faults (100k faults by
default), alternating, several runs each, pinned to CPU 0 and then unpinned. Each row
function returns one dict (name, runs, medians of p50/p99/faults per second); more rows
(e.g. traced runs) can be added the same way.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uffdtrace.exerciser import ExerciseConfig, run

MINIMAL_LOOP_SOURCE = Path(__file__).with_name("minimal_loop.c")
TARGET_RATIO = 1.10  # exerciser p50 within 10 % of the minimal loop, pinned

Sample = dict[str, float]


def build_c(source: Path, workdir: Path) -> Path:
    """Compile one of the bench's C programs with gcc -O2 into `workdir`."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SystemExit("bench: gcc not found (apt-get install gcc)")
    binary = workdir / source.stem
    subprocess.run([gcc, "-O2", "-pthread", "-o", str(binary), str(source)], check=True)
    return binary


def minimal_loop_sample(binary: Path, pages: int, cpu: int | None) -> Sample:
    args = [str(binary), str(pages), *([] if cpu is None else [str(cpu)])]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def exerciser_sample(pages: int, cpu: int | None) -> Sample:
    res = run(ExerciseConfig(backing="shmem", pages=pages, cpus=None if cpu is None else [cpu]))
    s = res.summary
    if s["mismatches"] or s["faults"] != pages:
        raise SystemExit(f"bench: exerciser run went wrong: {s}")
    return {key: s[key] for key in ("faults", "p50_ns", "p99_ns", "rate_per_s")}


def summarize(name: str, samples: list[Sample]) -> dict[str, Any]:
    """One table row: medians over the runs."""
    return {
        "name": name,
        "runs": len(samples),
        "p50_us": statistics.median(s["p50_ns"] for s in samples) / 1000,
        "p99_us": statistics.median(s["p99_ns"] for s in samples) / 1000,
        "faults_per_s": statistics.median(s["rate_per_s"] for s in samples),
    }


def alternate(runs: int, *samplers: Callable[[], Sample]) -> list[list[Sample]]:
    """Run the samplers in turn, `runs` rounds, so drift hits all of them alike."""
    results: list[list[Sample]] = [[] for _ in samplers]
    for _ in range(runs):
        for sampler, out in zip(samplers, results, strict=True):
            out.append(sampler())
    return results


def rows(pages: int = 100_000, runs: int = 5) -> list[dict[str, Any]]:
    """Minimal loop and exerciser, pinned to CPU 0 and unpinned; ratios against the loop."""
    out = []
    with tempfile.TemporaryDirectory(prefix="uffdtrace-bench-") as tmp:
        binary = build_c(MINIMAL_LOOP_SOURCE, Path(tmp))
        for cpu, placement in ((0, "pinned cpu0"), (None, "unpinned")):
            loop, exerciser = alternate(
                runs,
                lambda cpu=cpu: minimal_loop_sample(binary, pages, cpu),
                lambda cpu=cpu: exerciser_sample(pages, cpu),
            )
            base = summarize(f"minimal loop, {placement}", loop)
            row = summarize(f"exerciser, {placement}", exerciser)
            row["p50_ratio"] = row["p50_us"] / base["p50_us"]
            row["rate_ratio"] = row["faults_per_s"] / base["faults_per_s"]
            base["p50_ratio"] = base["rate_ratio"] = 1.0
            out += [base, row]
    return out
