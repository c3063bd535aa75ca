"""Guest side of the VM harness: runs inside the VM that tests/vm/harness.py boots.

    python tests/vm/guest.py OUTDIR BUDGET_S

OUTDIR is the only directory shared read-write with the host. This reads
OUTDIR/scenarios.json, runs `uffdtrace doctor --json` once, then each scenario: one
`uffdtrace record` (CSV and JSON summary) around tests/vm/workloads.py, which runs the
scenario's exerciser workloads and writes their ground truth; last it writes OUTDIR/done.
The host judges the files; this script only runs things and reports progress on the console,
since BCC compiles take 7-35 s under TCG.
Nothing runs past BUDGET_S (the host's timeout): the VM ends by itself even if its host
harness was SIGKILLed.

Stdlib only and started by path (not as a package): it must not depend on anything the guest
might lack.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[2]
UFFDTRACE = [sys.executable, "-m", "uffdtrace"]  # the harness starts us with the project's venv
DEFAULT_TIMEOUT_S = 240


def log(message: str) -> None:
    """One progress line on the VM console (saved by the host in console.log)."""
    print(f"vm-guest: {message}", flush=True)


def run(cmd: list[str], out: Path, err: Path, env: dict[str, str], timeout_s: float) -> int | None:
    """Run `cmd` with stdout/stderr to files; its exit status, or None if it timed out. Then
    its Pythons print where they were stuck (faulthandler, on SIGABRT) into `err`, and its whole
    process group is killed, so no tracer or workload outlives its scenario."""
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                env={**env, "PYTHONFAULTHANDLER": "1"}, cwd=PROJECT,
                                start_new_session=True)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            for sig, grace_s in ((signal.SIGABRT, 5), (signal.SIGKILL, 0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                time.sleep(grace_s)
            proc.wait()
            return None


def record_command(scenario: dict[str, Any], workdir: Path) -> list[str]:
    """`uffdtrace record ... -- python -m tests.vm.workloads DIR NAME=ARGS ...`."""
    workloads = [f"{name}={shlex.join(args)}" for name, args in scenario["workloads"].items()]
    return [*UFFDTRACE, "record", "--backend", scenario["backend"], "--mode", scenario["mode"],
            "-o", str(workdir / "rec.csv"), "--json", "--",
            sys.executable, "-m", "tests.vm.workloads", str(workdir), *workloads]


def run_scenario(scenario: dict[str, Any], outdir: Path, timeout_s: float) -> dict[str, Any]:
    """Run one scenario into OUTDIR/<name>/; returns its entry for results.json."""
    name = scenario["name"]
    workdir = outdir / name
    workdir.mkdir()  # the harness hands over an empty OUTDIR: nothing stale to read
    env = {**os.environ, **scenario.get("env", {})}
    start = time.monotonic()
    rc = run(record_command(scenario, workdir), workdir / "summary.json", workdir / "stderr.txt",
             env, timeout_s)
    wall_s = round(time.monotonic() - start, 1)
    (workdir / "returncode").write_text(f"{'timeout' if rc is None else rc}\n")
    return {"name": name, "returncode": rc, "timed_out": rc is None, "wall_s": wall_s}


def main(outdir: Path, budget_s: float) -> int:
    """Doctor, then every scenario in order; `done` only once all were run."""
    begin = time.monotonic()

    def left(wanted: float = DEFAULT_TIMEOUT_S) -> float:
        return max(0.0, min(wanted, begin + budget_s - time.monotonic()))

    scenarios = json.loads((outdir / "scenarios.json").read_text())
    log(f"kernel {os.uname().release}, {os.cpu_count()} CPUs, {len(scenarios)} scenarios")

    log("doctor --json ...")
    start = time.monotonic()
    rc = run([*UFFDTRACE, "doctor", "--json"], outdir / "doctor.json", outdir / "doctor.stderr",
             dict(os.environ), left())
    results: list[dict[str, Any]] = [{"name": "doctor", "returncode": rc, "timed_out": rc is None,
                                      "wall_s": round(time.monotonic() - start, 1)}]
    log(f"doctor: exit {rc} in {results[0]['wall_s']} s")

    for i, scenario in enumerate(scenarios, 1):
        if not left():
            log(f"out of time after {budget_s} s: {len(scenarios) - i + 1} scenarios not run")
            return 1
        log(f"[{i}/{len(scenarios)}] {scenario['name']}: record --backend {scenario['backend']} "
            f"--mode {scenario['mode']} -- workloads {', '.join(scenario['workloads'])} ...")
        result = run_scenario(scenario, outdir, left(scenario.get("timeout_s", DEFAULT_TIMEOUT_S)))
        results.append(result)
        status = "TIMED OUT" if result["timed_out"] else f"exit {result['returncode']}"
        log(f"[{i}/{len(scenarios)}] {scenario['name']}: {status} in {result['wall_s']} s")

    (outdir / "results.json").write_text(json.dumps(results, indent=2))
    total = round(time.monotonic() - begin, 1)
    (outdir / "done").write_text(f"{total}\n")
    log(f"done in {total} s")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} OUTDIR BUDGET_S")
    sys.exit(main(Path(sys.argv[1]), float(sys.argv[2])))
