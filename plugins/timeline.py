"""Fault rate over time: per interval (option interval_s) faults/s, CONTINUE/s and p99 stall.

Table:
  intervals  start_ns, t_s, faults, faults_per_s, continue_per_s, p99_stall_ns

Intervals are aligned to multiples of interval_s of CLOCK_MONOTONIC, by fault_ns; t_s is the
interval's start in seconds from the first one. Intervals without faults are listed with 0.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pandas as pd

from uffdtrace.plugins import Plugin, RunContext

COLUMNS = ["start_ns", "t_s", "faults", "faults_per_s", "continue_per_s", "p99_stall_ns"]


class TimelinePlugin(Plugin):
    name = "timeline"
    description = "faults/s, CONTINUE/s and p99 stall per interval"
    options: ClassVar[dict[str, Any]] = {"interval_s": 1.0}
    columns = ("fault_ns", "resolver", "stall_ns")

    def start(self, ctx: RunContext) -> None:
        if ctx.options["interval_s"] <= 0:
            raise ValueError("option interval_s must be positive")
        self.interval_ns = int(ctx.options["interval_s"] * 1e9)
        self._parts: list[pd.DataFrame] = []

    def batch(self, df: pd.DataFrame) -> None:
        df = df[df["fault_ns"].notna()]
        self._parts.append(pd.DataFrame({
            "slot": df["fault_ns"].to_numpy(np.int64) // self.interval_ns,
            "continue": (df["resolver"] == "CONTINUE").fillna(False).to_numpy(bool),
            "stall_ns": df["stall_ns"].astype("Float64"),
        }))

    def finish(self) -> dict[str, pd.DataFrame]:
        parts = [p for p in self._parts if not p.empty]
        if not parts:
            return {"intervals": pd.DataFrame(columns=COLUMNS)}
        df = pd.concat(parts, ignore_index=True)
        g = df.groupby("slot")
        slots = np.arange(df["slot"].min(), df["slot"].max() + 1)
        out = pd.DataFrame({"faults": g.size(), "continues": g["continue"].sum(),
                            "p99": g["stall_ns"].quantile(0.99)}).reindex(slots)
        seconds = self.interval_ns / 1e9
        return {"intervals": pd.DataFrame({
            "start_ns": slots * self.interval_ns,
            "t_s": (slots - slots[0]) * seconds,
            "faults": out["faults"].fillna(0).astype(np.int64).to_numpy(),
            "faults_per_s": out["faults"].fillna(0).to_numpy(np.float64) / seconds,
            "continue_per_s": out["continues"].fillna(0).to_numpy(np.float64) / seconds,
            "p99_stall_ns": out["p99"].round().astype("Int64").to_numpy(),
        }, columns=COLUMNS)}
