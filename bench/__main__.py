"""`python -m bench`: benchmark rows as a table, and the exerciser's overhead target."""

from __future__ import annotations

import os
import sys

from bench.exerciser_bench import TARGET_RATIO, rows
from bench.table import format_table

COLUMNS = ["name", "runs", "p50_us", "p99_us", "faults_per_s", "p50_ratio", "rate_ratio"]


def main() -> int:
    load = os.getloadavg()[0]
    print("shmem minor faults, 1 faulting + 1 handler thread, 100k faults; medians of 5 runs "
          f"(alternating); load average {load:.2f} at start (other work skews these)",
          flush=True)
    table = rows()
    print(format_table(table, COLUMNS))
    pinned = next(r for r in table if r["name"] == "exerciser, pinned cpu0")
    ok = pinned["p50_ratio"] <= TARGET_RATIO
    print(f"\ntarget: exerciser p50 within {TARGET_RATIO - 1:.0%} of the minimal loop, pinned: "
          f"{'met' if ok else 'MISSED'} (ratio {pinned['p50_ratio']:.3f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
