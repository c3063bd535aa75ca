"""What tracing costs the traced workload: untraced vs `record --mode light` vs `--mode full`
vs `export` (--mode stats) vs the bpftrace peer (bench/peer.bt), alternating runs, on two 1 + 1
thread shmem minor-fault workloads pinned to CPU 0: the exerciser, and bench/minimal_loop.c (a
plain poll -> read -> CONTINUE handler written apart from the exerciser); then a soak at
>= 100k faults/s for losses. Empty BPF programs on each mode's tracepoints give the floor: what
attaching there costs before any work is done.

The workload's own numbers (its p50 round trip and faults/s) are the measure; the tracer's
start-up, CPU and BPF run time come from `record --json`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bench.exerciser_bench import MINIMAL_LOOP_SOURCE, alternate, build_c, summarize

PEER = Path(__file__).with_name("peer.bt")
UFFDTRACE = [sys.executable, "-m", "uffdtrace"]
STARTUP_TARGET_S = 2.0
# --mode stats (issue #14): at most 3 points above the floor of its tracepoints and a third of
# the bpftrace peer's overhead; the exporter's CPU at most 2 % of a core at 100k faults/s
STATS_ABOVE_FLOOR = 0.03
STATS_OF_PEER = 1 / 3
STATS_CPU_AT_100K = 0.02
# Issue #15, p50 overhead over untraced: light at most 1.5 x its floor's, full at most 0.7 x
# the bpftrace peer's
LIGHT_OF_FLOOR = 1.5
FULL_OF_PEER = 0.7


@dataclass(frozen=True)
class Workload:
    """A pinned workload that prints one JSON line with faults, p50_ns, p99_ns, rate_per_s."""

    name: str
    argv: Callable[[int], list[str]]  # pages -> command
    comm: str  # its faulting process's name, as a regex (export --comm)


def exerciser() -> Workload:
    return Workload("exerciser", lambda pages: [*UFFDTRACE, "exercise", "--pages", str(pages),
                                                "--cpus", "0", "--json"], "^python")


def minimal_loop(workdir: Path) -> Workload:
    binary = build_c(MINIMAL_LOOP_SOURCE, workdir)
    return Workload("minimal loop", lambda pages: [str(binary), str(pages), "0"], f"^{binary.name}$")


def untraced(work: Workload, pages: int) -> dict[str, float]:
    out = subprocess.run(work.argv(pages), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def traced(work: Workload, pages: int, mode: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        result, csv = Path(tmp) / "workload.json", Path(tmp) / "faults.csv"
        command = " ".join(work.argv(pages)) + f" > {result}"
        out = subprocess.run(
            [*UFFDTRACE, "record", "--mode", mode, "-o", str(csv), "--json", "--",
             "sh", "-c", command], capture_output=True, text=True, check=True)
        tracer = json.loads(out.stdout)
        sample = json.loads(result.read_text())
        if tracer["faults"] != sample["faults"] and "pid" in sample:  # the exerciser says its pid
            recorded = pd.read_csv(csv, usecols=["pid", "comm", "outcome"])
            print(f"bench: {mode} recorded {tracer['faults']} of {sample['faults']} faults: "
                  f"{mismatches(recorded, [sample])}", file=sys.stderr, flush=True)
    sample.update(startup_s=tracer["startup_s"], tracer_cpu_s=tracer["tracer_cpu_s"],
                  bpf_ms=tracer["bpf_run_ns"] / 1e6, lost=tracer["lost_total"],
                  miscounted=abs(tracer["faults"] - sample["faults"]))
    return sample


def exported(work: Workload, pages: int) -> dict[str, float]:
    """The workload under `uffdtrace export` (--mode stats), which finds it when it sets up its
    userfaultfd; faults, the exporter's CPU and BPF time from its own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.prometheus import free_port

    port = free_port()
    exporter = subprocess.Popen([*UFFDTRACE, "export", "--listen", f"127.0.0.1:{port}",
                                 "--comm", work.comm, "--interval", "1"],
                                stderr=subprocess.PIPE, text=True)

    def metrics() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals

    try:
        for line in exporter.stderr:
            if "exporting" in line:
                break
        else:
            raise SystemExit(f"bench: the exporter did not start (exit {exporter.wait()})")
        before, t0 = metrics(), time.monotonic()
        sample = untraced(work, pages)
        # The last counts are read at the exporter's next tick (1 s, and the tick's own time on
        # a busy machine): until then, or 3 s, whichever first; a count still off is reported.
        deadline = time.monotonic() + 3.0
        while True:
            after, window_s = metrics(), time.monotonic() - t0
            counted = after.get("uffdtrace_faults_total", 0) - before.get("uffdtrace_faults_total", 0)
            if counted == sample["faults"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        exporter.terminate()
        exporter.wait()
    faults = after.get("uffdtrace_faults_total", 0) - before.get("uffdtrace_faults_total", 0)
    cpu_s = after["uffdtrace_process_cpu_seconds_total"] - before["uffdtrace_process_cpu_seconds_total"]
    sample.update(startup_s=after["uffdtrace_startup_seconds"], tracer_cpu_s=cpu_s, window_s=window_s,
                  bpf_ms=(after["uffdtrace_bpf_run_seconds_total"]
                          - before["uffdtrace_bpf_run_seconds_total"]) * 1e3,
                  lost=after["uffdtrace_lost_events_total"], miscounted=abs(faults - sample["faults"]))
    return sample


def tracepoints_of(mode: str) -> list[str]:
    """The raw tracepoints `record --mode MODE` attaches (the tracepoint backend's programs)."""
    from uffdtrace.probes.tracepoint import TracepointBackend, TraceScope

    backend = TracepointBackend(mode=mode, scope=TraceScope())
    backend.start()
    try:
        return backend.raw_tracepoints()
    finally:
        backend.close()


def floor(work: Workload, pages: int, tracepoints: list[str]) -> dict[str, float]:
    """The workload with empty BPF programs on those tracepoints: what merely running a program
    there costs, the least any tracer built on them can cost."""
    from bcc import BPF

    bpf = BPF(text="\n".join(f"RAW_TRACEPOINT_PROBE({tp}) {{ return 0; }}" for tp in tracepoints))
    try:
        return untraced(work, pages)
    finally:
        bpf.cleanup()


def peer(work: Workload, pages: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".txt") as hist:
        out = subprocess.run(
            ["bpftrace", "-o", hist.name, "-c", " ".join(work.argv(pages)), str(PEER)],
            capture_output=True, text=True, check=True)
        if "@stall_us" not in Path(hist.name).read_text():
            raise SystemExit("bench: bpftrace printed no stall histogram")
    return json.loads(out.stdout)


def overhead_rows(work: Workload, pages: int = 100_000, runs: int = 5) -> list[dict[str, Any]]:
    light_tps, full_tps = tracepoints_of("light"), tracepoints_of("full")
    assert tracepoints_of("stats") == full_tps, "stats mode's floor is full mode's"
    base, light, full, bt, light_floor, full_floor, stats = alternate(
        runs,
        lambda: untraced(work, pages),
        lambda: traced(work, pages, "light"),
        lambda: traced(work, pages, "full"),
        lambda: peer(work, pages),
        lambda: floor(work, pages, light_tps),
        lambda: floor(work, pages, full_tps),
        lambda: exported(work, pages),
    )
    rows = []
    for name, samples in (("untraced", base), ("record --mode light", light),
                          ("record --mode full", full), ("bpftrace peer", bt),
                          ("empty programs, light's tracepoints", light_floor),
                          ("empty programs, full's tracepoints", full_floor),
                          ("export (--mode stats)", stats)):
        row = summarize(name, samples)
        for key in ("startup_s", "tracer_cpu_s", "bpf_ms", "lost", "window_s"):
            if key in samples[0]:
                row[key] = statistics.median(s[key] for s in samples)
        if "miscounted" in samples[0]:
            row["miscounted"] = sum(s["miscounted"] for s in samples)  # over all runs
        rows.append(row)
    untraced_row = rows[0]
    for row in rows:
        row["p50_ratio"] = row["p50_us"] / untraced_row["p50_us"]
        row["rate_ratio"] = row["faults_per_s"] / untraced_row["faults_per_s"]
    return rows


# The machine at its limit (issue #15): 8 faulting threads and 2 handler threads, unpinned.
LIMIT_ARGS = ["--threads", "8", "--handler-threads", "2"]


def soak(seconds: float = 60.0, pages: int = 300_000, mode: str = "full") -> dict[str, Any]:
    """Back-to-back exerciser runs at the machine's limit (LIMIT_ARGS) under one `record` for
    `seconds`: losses and the rate. The CSV (about 1.5 GB a minute) goes to RAM, so that the
    soak measures the tracer rather than this disk's writeback."""
    workload = [*UFFDTRACE, "exercise", "--pages", str(pages), *LIMIT_ARGS, "--json"]
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        log = Path(tmp) / "runs.jsonl"
        loop = (f"end=$(($(date +%s) + {int(seconds)})); while [ $(date +%s) -lt $end ]; do "
                + " ".join(workload) + f" >> {log}; done")
        csv = Path(tmp) / "faults.csv"
        t0 = time.monotonic()
        out = subprocess.run(
            [*UFFDTRACE, "record", "--mode", mode, "-o", str(csv), "--json", "--",
             "sh", "-c", loop], capture_output=True, text=True, check=True)
        wall = time.monotonic() - t0
        tracer = json.loads(out.stdout)
        runs = [json.loads(line) for line in log.read_text().splitlines()]
        recorded = pd.read_csv(csv, usecols=["pid", "comm", "outcome"])
    return {
        "mode": mode,
        "seconds": round(wall, 1),
        "workload_faults": sum(r["faults"] for r in runs),
        "recorded_faults": tracer["faults"],
        "lost": tracer["lost_total"],
        "median_run_rate_per_s": statistics.median(r["rate_per_s"] for r in runs),
        "tracer_cpu_s": tracer["tracer_cpu_s"],
        "mismatched": mismatches(recorded, runs),
    }


def mismatches(recorded: pd.DataFrame, runs: list[dict[str, Any]]) -> dict[int, str]:
    """Processes whose recorded rows differ in number from their faults (none for a process
    that is not an exerciser run): the difference, and the comm and outcome of their rows."""
    expected = pd.Series({r["pid"]: r["faults"] for r in runs}, dtype=int)
    seen = recorded.groupby("pid").size()
    diff = seen.sub(expected, fill_value=0).astype(int)
    out = {}
    for pid, n in diff[diff != 0].items():
        rows = recorded[recorded["pid"] == pid]
        out[int(pid)] = f"{n:+d}: " + ", ".join(sorted(set(rows["comm"] + " " + rows["outcome"])))
    return out
