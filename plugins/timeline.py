"""Fault rate over time: per interval (option interval_s) faults/s, CONTINUE/s and p99 stall.

Table:
  intervals  start_ns, t_s, faults, faults_per_s, continue_per_s, p99_stall_ns

Intervals are aligned to multiples of interval_s of CLOCK_MONOTONIC, by fault_ns; t_s is the
interval's start in seconds from the first one. Intervals without faults are listed with 0.

Panel (live viewers): faults/s and CONTINUE/s in the last complete second, their peak and the
last minute, per second of CLOCK_MONOTONIC (the data's own clock when replayed: no tick()).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pandas as pd

from uffdtrace.plugins import Panel, Plugin, Rate, Rates, RunContext

COLUMNS = ["start_ns", "t_s", "faults", "faults_per_s", "continue_per_s", "p99_stall_ns"]
HISTORY_S = 60


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
        self.keep = ctx.tables
        self._now_s: int | None = None
        self.reset()

    def reset(self) -> None:
        self._per_s: dict[str, dict[int, int]] = {"faults/s": {}, "CONTINUE/s": {}}
        self._peak = dict.fromkeys(self._per_s, 0)
        self._last_s = 0  # latest second seen in the data

    def tick(self, now_ns: int) -> None:
        self._now_s = now_ns // 1_000_000_000

    def batch(self, df: pd.DataFrame) -> None:
        df = df[df["fault_ns"].notna()]
        fault_ns = df["fault_ns"].to_numpy(np.int64)
        is_continue = (df["resolver"] == "CONTINUE").fillna(False).to_numpy(bool)
        if self.keep:
            self._parts.append(pd.DataFrame({"slot": fault_ns // self.interval_ns,
                                             "continue": is_continue,
                                             "stall_ns": df["stall_ns"].astype("Float64")}))
        second = pd.Series(fault_ns // 1_000_000_000)
        for name, rows in (("faults/s", second), ("CONTINUE/s", second[is_continue])):
            counts = self._per_s[name]
            for s, n in rows.value_counts().items():
                counts[int(s)] = counts.get(int(s), 0) + int(n)
        if len(second):
            self._last_s = max(self._last_s, int(second.max()))

    def panels(self) -> list[Panel]:
        now = self._last_s + 1 if self._now_s is None else self._now_s
        seconds = range(now - HISTORY_S, now)  # complete seconds only
        rates = []
        for name, counts in self._per_s.items():
            for s in [s for s in counts if s < now - HISTORY_S]:
                self._peak[name] = max(self._peak[name], counts.pop(s))
            history = tuple(float(counts.get(s, 0)) for s in seconds)
            self._peak[name] = max(self._peak[name], *history)
            rates.append(Rate(name, history[-1], self._peak[name], history))
        return [Panel("rates", (Rates("rates, last minute", tuple(rates)),))]

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
