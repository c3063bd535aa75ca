"""Stall percentiles and blocked time per traced process: a user plugin (README, the study).

Run with: uffdtrace record ... --plugin docs/per_process.py   (or uffdtrace report FILE.csv ...)
"""

import pandas as pd

from uffdtrace.plugins import Plugin, RunContext


class PerProcess(Plugin):
    name = "per_process"
    description = "stall p50/p99 and blocked time per process"
    columns = ("pid", "comm", "stall_ns")

    def start(self, ctx: RunContext) -> None:
        self.parts: list[pd.DataFrame] = []

    def batch(self, df: pd.DataFrame) -> None:
        self.parts.append(df[["pid", "stall_ns"]])

    def finish(self) -> dict[str, pd.DataFrame]:
        if not self.parts:
            return {}
        stalls = pd.concat(self.parts).groupby("pid")["stall_ns"]
        table = pd.DataFrame({
            "faults": stalls.size(),  # stall statistics skip faults that never had to wait
            "p50_us": stalls.median() / 1000,
            "p99_us": stalls.quantile(0.99) / 1000,
            "blocked_ms": stalls.sum() / 1e6,
        }).reset_index()
        return {"stall": table.astype({"p50_us": float, "p99_us": float}).round(1)}
