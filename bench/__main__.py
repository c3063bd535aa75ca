"""`python -m bench` (`make bench`): the exerciser against a minimal C loop, what tracing costs
the workload (record's modes, the exporter's stats mode, the bpftrace peer), how closely
per-fault stalls match the workload's own timings out to p99, a soak for losses, and `report`
over 10 M rows. Run it on a quiet machine."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import accuracy_bench, exerciser_bench, tracer_bench
from bench.table import format_table

EXERCISER_COLUMNS = ["name", "runs", "p50_us", "p99_us", "faults_per_s", "p50_ratio", "rate_ratio"]
TRACER_COLUMNS = ["name", "runs", "p50_us", "p99_us", "faults_per_s", "p50_ratio", "rate_ratio",
                  "startup_s", "tracer_cpu_s", "bpf_ms", "lost", "miscounted"]
ACCURACY_COLUMNS = ["name", "runs", "gap_p50_us", "gap_p90_us", "gap_p99_us", "beyond_pct",
                    "runs_within", "entry_over_2us_pct", "exit_over_2us_pct", "exit_over_50us_pct",
                    "host_noise_pct"]
SECTIONS = ("exerciser", "overhead", "accuracy", "soak", "report")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="alternating runs per row")
    parser.add_argument("--soak-s", type=float, default=60.0, help="soak duration")
    parser.add_argument("--only", action="append", choices=SECTIONS,
                        help="run only this section (repeatable; default: all)")
    args = parser.parse_args()
    sections = args.only or SECTIONS
    print(f"load average {os.getloadavg()[0]:.2f} (benchmark a quiet machine)\n", flush=True)
    verdicts = []

    if "exerciser" in sections:
        verdicts += exerciser_section(args.runs)
    if "overhead" in sections:
        verdicts += overhead_section(args.runs)
    if "accuracy" in sections:
        verdicts += accuracy_section(args.runs)
    if "soak" in sections:
        verdicts += soak_section(args.soak_s)
    if "report" in sections:
        verdicts += report_section()

    print("\ntargets:")
    for what, ok, value in verdicts:
        print(f"  {'met   ' if ok else 'MISSED'}  {what}: {value}")
    return 0 if all(ok for _, ok, _ in verdicts) else 1


Verdict = tuple[str, bool, str]


def exerciser_section(runs: int) -> list[Verdict]:
    print("shmem minor faults, 1 faulting + 1 handler thread, 100k faults; medians of "
          f"{runs} alternating runs", flush=True)
    table = exerciser_bench.rows(runs=runs)
    print(format_table(table, EXERCISER_COLUMNS))
    pinned = next(r for r in table if r["name"] == "exerciser, pinned cpu0")
    return [(f"exerciser p50 within {exerciser_bench.TARGET_RATIO - 1:.0%} of the "
             "minimal loop (pinned)", pinned["p50_ratio"] <= exerciser_bench.TARGET_RATIO,
             f"ratio {pinned['p50_ratio']:.3f}")]


def overhead_section(runs: int) -> list[Verdict]:
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="uffdtrace-bench-") as tmp:
        for work in (tracer_bench.exerciser(), tracer_bench.minimal_loop(Path(tmp))):
            print(f"\n{work.name}: pinned to CPU 0, traced; tracer unpinned", flush=True)
            table = tracer_bench.overhead_rows(work, runs=runs)
            print(format_table(table, TRACER_COLUMNS))
            verdicts += [(f"{work.name}, {what}", ok, value)
                         for what, ok, value in record_verdicts(table) + stats_verdicts(table)]
    return verdicts


def record_verdicts(table: list[dict]) -> list[Verdict]:
    """`record`'s modes: overhead against their floors and the peer (issue #15), start-up, and
    one record per fault."""
    by_name = {row["name"]: row for row in table}
    over = {name: row["p50_ratio"] - 1 for name, row in by_name.items()}
    light, full, peer = over["record --mode light"], over["record --mode full"], over["bpftrace peer"]
    light_floor = over["empty programs, light's tracepoints"]
    verdicts = [
        (f"light: p50 overhead at most {tracer_bench.LIGHT_OF_FLOOR} x its floor's",
         light <= tracer_bench.LIGHT_OF_FLOOR * light_floor, f"{light:+.1%} (floor {light_floor:+.1%})"),
        (f"full: p50 overhead at most {tracer_bench.FULL_OF_PEER} x the bpftrace peer's",
         full <= tracer_bench.FULL_OF_PEER * peer, f"{full:+.1%} (peer {peer:+.1%})"),
    ]
    for mode in ("light", "full"):
        row = by_name[f"record --mode {mode}"]
        verdicts.append((f"{mode}: start-up at most {tracer_bench.STARTUP_TARGET_S:.0f} s",
                         row["startup_s"] <= tracer_bench.STARTUP_TARGET_S, f"{row['startup_s']:.2f} s"))
        verdicts.append((f"{mode}: no lost events", row["lost"] == 0, f"{row['lost']:.0f} lost"))
        verdicts.append((f"{mode}: one record per fault", row["miscounted"] == 0,
                         f"{row['miscounted']} rows off in {row['runs']} runs"))
    return verdicts


def stats_verdicts(table: list[dict]) -> list[Verdict]:
    """--mode stats (issue #14): overhead against its floor and the peer, and the exporter's CPU."""
    by_name = {row["name"]: row for row in table}
    stats, peer = by_name["export (--mode stats)"], by_name["bpftrace peer"]
    floor = by_name["empty programs, full's tracepoints"]
    over, over_floor, over_peer = stats["p50_ratio"] - 1, floor["p50_ratio"] - 1, peer["p50_ratio"] - 1
    cpu = stats["tracer_cpu_s"] / stats["window_s"]  # while the workload ran, until its last counts were read
    return [
        ("stats: p50 at most 3 points above the floor of its tracepoints",
         over <= over_floor + tracer_bench.STATS_ABOVE_FLOOR, f"{over:+.1%} (floor {over_floor:+.1%})"),
        ("stats: at most a third of the bpftrace peer's overhead",
         over <= over_peer * tracer_bench.STATS_OF_PEER, f"{over:+.1%} (peer {over_peer:+.1%})"),
        ("stats: exporter CPU at most 2 % of a core at 100k faults/s",
         cpu <= tracer_bench.STATS_CPU_AT_100K and stats["faults_per_s"] >= 100_000,
         f"{cpu:.1%} of a core ({stats['tracer_cpu_s']:.3f} s over {stats['window_s']:.1f} s; "
         f"the workload at {stats['faults_per_s']:,.0f} faults/s)"),
        ("stats: every fault counted, none lost", stats["miscounted"] == 0 and stats["lost"] == 0,
         f"{stats['miscounted']:.0f} off, {stats['lost']:.0f} lost"),
    ]


def accuracy_section(runs: int) -> list[Verdict]:
    print("\nper fault, the workload's touch against the recorded stall (gap = touch - stall); "
          f"1 + 1 threads pinned to CPU 0, CONTINUE; medians of {runs} runs", flush=True)
    table = accuracy_bench.rows(runs=runs)
    print(format_table(table, ACCURACY_COLUMNS))
    return [(f"{row['name']}: stall within 5 % or 2 µs of the touch at p99",
             row["error_p99"] <= 1,
             f"p99 gap {row['gap_p99_us']:.1f} µs, {row['beyond_pct']:.1f} % beyond; "
             f"{row['runs_within']}/{row['runs']} runs within (host: "
             f"{row['host_noise_pct']:.2f} % of plain 1 µs windows stretched > 1 µs)")
            for row in table]


def report_section() -> list[Verdict]:
    """`report` over a 10 M-row Parquet recording (bench/report_bench.py prints its table)."""
    print("\nreport, 10 M rows from Parquet, default plugins", flush=True)
    done = subprocess.run([sys.executable, "-m", "bench.report_bench"])
    return [("report: 10 M rows from Parquet in < 30 s and < 4 GiB", done.returncode == 0,
             "see the table above")]


def soak_section(seconds: float) -> list[Verdict]:
    verdicts = []
    for mode in ("light", "full"):
        soak = tracer_bench.soak(seconds=seconds, mode=mode)
        print(f"\nsoak, {mode}: {soak}", flush=True)
        verdicts.append((f"soak {mode}: every fault recorded, none lost",
                         soak["lost"] == 0 and soak["recorded_faults"] == soak["workload_faults"],
                         f"{soak['recorded_faults']}/{soak['workload_faults']}, "
                         f"lost {soak['lost']}, {soak['median_run_rate_per_s']:.0f} faults/s"))
    return verdicts


if __name__ == "__main__":
    sys.exit(main())
