"""`python -m bench.report_bench`: `uffdtrace report` over a big Parquet recording (issue #14:
10 M rows in under 30 s and 4 GiB).

Writes N synthetic fault rows (default 10 M) with the record Parquet writer itself
(sinks/parquet.py), then times `uffdtrace report FILE` with the default plugins under
`/usr/bin/time -v`, RUNS times: wall clock and peak RSS of each run (with the load average
before it), and their medians. Run it on a quiet machine.

The rows look like a recording of two QEMU post-copy migrations and an exerciser over about
100 s: three processes with 8 faulting threads between them (the QEMU ones are vCPUs), each
fault on a random page of its process's 8 GiB (so most pages fault once, as in post-copy;
shmem and anon in 4 KiB pages, hugetlb in 2 MiB ones), a stall that is log-normal around 15 us
(most within 5-50 us, with a tail), handler and CONTINUE times in proportion, the kprobe
backend's columns empty, full mode's empty on a fifth of the rows (as light mode leaves them),
and a few faults that never waited, were resolved by a failed ioctl or were still blocked at
the end.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from bench.table import format_table
from uffdtrace.events import coerce_faults
from uffdtrace.sinks.parquet import ParquetSink

ROWS = 10_000_000
RUNS = 3
WALL_TARGET_S = 30.0
RSS_TARGET_KIB = 4 << 20
CHUNK = 100_000
UFFDTRACE = [sys.executable, "-m", "uffdtrace"]

# (pid, tid, comm, vcpu, backing, handler tid): 8 faulting threads in 3 processes
THREADS = [
    (4242, 4250 + i, f"CPU {i}/KVM", i, "anon", 4244) for i in range(4)
] + [
    (5120, 5130 + i, f"CPU {i}/KVM", i, "shmem", 5122) for i in range(2)
] + [
    (6001, 6003 + i, "uffdx-fault", None, "hugetlb", 6002) for i in range(2)
]
REGION = 8 << 30  # each process's memory
HUGE = 2 << 20


def fault_rows(rows: int, seed: int = 14) -> Iterator[pd.DataFrame]:
    """`rows` synthetic fault rows in time order, in chunks of CHUNK, with FAULT_COLUMNS."""
    rng = np.random.default_rng(seed)
    threads = pd.DataFrame(THREADS, columns=["pid", "tid", "comm", "vcpu", "backing", "htid"])
    base = {pid: 0x7F0000000000 + i * (REGION << 1) for i, pid in enumerate(threads["pid"].unique())}
    t = 10**12
    for first in range(0, rows, CHUNK):
        n = min(CHUNK, rows - first)
        who = threads.iloc[rng.integers(0, len(threads), n)].reset_index(drop=True)
        fault = t + np.cumsum(rng.exponential(10_000, n).astype(np.int64) + 1)  # ~100k faults/s
        t = int(fault[-1])
        huge = (who["backing"] == "hugetlb").to_numpy()
        page_size = np.where(huge, HUGE, 4096)
        addr = (who["pid"].map(base).to_numpy(np.int64)
                + rng.integers(0, REGION // 4096, n) * 4096)
        addr = addr // page_size * page_size + rng.integers(0, 4096, n)
        stall = rng.lognormal(np.log(15_000), 0.6, n).astype(np.int64) + 2_000
        block = fault + rng.integers(500, 1_500, n)
        notify = rng.lognormal(np.log(2_000), 0.5, n).astype(np.int64)
        handler = rng.lognormal(np.log(3_000), 0.5, n).astype(np.int64)
        cont = rng.lognormal(np.log(1_500), 0.4, n).astype(np.int64)
        msg = block + notify
        cont_enter = msg + handler
        cont_exit = cont_enter + cont
        ret = fault + stall
        resume = ret - rng.integers(500, 2_000, n)
        wake = np.minimum(cont_exit, resume)
        missing = (who["backing"] == "anon").to_numpy()
        df = pd.DataFrame({
            "fault_ns": fault, "pid": who["pid"], "tid": who["tid"], "comm": who["comm"],
            "vcpu": who["vcpu"].astype("Int64"), "addr": addr, "page_size": page_size,
            "backing": who["backing"], "kind": np.where(missing, "missing", "minor"),
            "stall_ns": stall, "notify_ns": notify, "handler_ns": handler, "continue_ns": cont,
            "wake_to_run_ns": resume - wake,
            "resolver": np.where(missing, "COPY", "CONTINUE"),
            "handler_pid": who["pid"], "handler_tid": who["htid"], "errno": 0,
            "mapped": page_size, "block_ns": block, "msg_ns": msg, "cont_enter_ns": cont_enter,
            "cont_exit_ns": cont_exit, "wake_ns": wake, "resume_ns": resume, "return_ns": ret,
            "outcome": "resolved",
        })
        light = rng.random(n) < 0.2  # a light-mode share: no message, ioctl or errno
        df.loc[light, ["notify_ns", "handler_ns", "continue_ns", "resolver", "errno", "mapped",
                       "msg_ns", "cont_enter_ns", "cont_exit_ns"]] = None
        df.loc[rng.random(n) < 0.01, "kind"] = None  # a calibration that could not tell
        no_wait = ~light & (rng.random(n) < 0.02)
        df.loc[no_wait, ["block_ns", "notify_ns", "wake_ns", "resume_ns", "wake_to_run_ns"]] = None
        df.loc[no_wait, "outcome"] = "no_wait"
        df.loc[~light & (rng.random(n) < 0.0005), "errno"] = 17
        if first + n == rows:  # still blocked when tracing ended
            df.loc[df.index[-5:], ["stall_ns", "wake_ns", "resume_ns", "return_ns",
                                   "wake_to_run_ns"]] = None
            df.loc[df.index[-5:], "outcome"] = "unresolved_end"
        df.index = pd.RangeIndex(first, first + n)
        yield coerce_faults(df)


def write_recording(path: Path, rows: int, seed: int = 14) -> None:
    """`rows` synthetic rows into a Parquet file, through the record writer."""
    sink = ParquetSink(path)
    for chunk in fault_rows(rows, seed):
        sink.write(chunk)
    sink.close()


def timed_report(path: Path, *args: str) -> dict[str, float]:
    """One `uffdtrace report PATH ARGS` under /usr/bin/time -v: its wall time and peak RSS."""
    out = subprocess.run(["/usr/bin/time", "-v", *UFFDTRACE, "report", str(path), *args],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"report failed ({out.returncode}):\n{out.stderr}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)",
                     out.stderr)
    hours, minutes, seconds = int(wall[1] or 0), int(wall[2]), float(wall[3])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)[1])
    return {"wall_s": hours * 3600 + minutes * 60 + seconds, "max_rss_mib": rss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=ROWS, help="rows to generate")
    parser.add_argument("--runs", type=int, default=RUNS, help="timed report runs")
    parser.add_argument("--file", type=Path,
                        help="keep the recording here (reused when it exists); default: a "
                             "temporary file")
    parser.add_argument("report_args", nargs=argparse.REMAINDER,
                        help="after --: more arguments for report (e.g. -- --plugin latency)")
    args = parser.parse_args()
    extra = args.report_args[1:] if args.report_args[:1] == ["--"] else args.report_args
    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or Path(tmp) / "big.parquet"
        if not path.exists():
            t0 = time.monotonic()
            write_recording(path, args.rows)
            print(f"wrote {args.rows:,} rows to {path} ({path.stat().st_size / 2**20:,.0f} MiB) "
                  f"in {time.monotonic() - t0:.1f} s", flush=True)
        runs = []
        columns = ["run", "wall_s", "max_rss_mib", "load"]
        for i in range(args.runs):
            load = os.getloadavg()[0]  # a busy machine slows the runs: say so
            runs.append({"run": i + 1, **timed_report(path, *extra), "load": load})
            print(format_table(runs[-1:], columns).splitlines()[-1], flush=True)
        median = {"run": "median", **{k: statistics.median(r[k] for r in runs)
                                      for k in ("wall_s", "max_rss_mib")}}
        print()
        print(format_table([*runs, median], columns))
    ok = median["wall_s"] < WALL_TARGET_S and median["max_rss_mib"] * 1024 < RSS_TARGET_KIB
    print(f"\ntargets (10 M rows): wall < {WALL_TARGET_S:.0f} s, max RSS < "
          f"{RSS_TARGET_KIB >> 20} GiB: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
