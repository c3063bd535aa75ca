"""Several exerciser runs in one process: the workload of one traced session in the VM.

    python -m tests.vm.workloads OUTDIR NAME=ARGS [NAME=ARGS ...]

Each NAME=ARGS is one `uffdtrace exercise ARGS` run whose ground truth lands in
OUTDIR/NAME.csv and OUTDIR/NAME.json. Under TCG, starting Python and importing numpy and
pandas takes tens of seconds, so one process runs them all; every run has its own threads, so
the recorded faults split by the tids in each ground truth.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path

from uffdtrace.cli import main as uffdtrace


def run_all(outdir: Path, workloads: list[str]) -> int:
    failed = 0
    for spec in workloads:
        name, _, args = spec.partition("=")
        argv = ["exercise", *shlex.split(args), "--csv", str(outdir / f"{name}.csv"), "--json"]
        with open(outdir / f"{name}.json", "w") as out, contextlib.redirect_stdout(out):
            failed += uffdtrace(argv) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_all(Path(sys.argv[1]), sys.argv[2:]))
