"""Fault rate over time: per interval (option interval_s) faults/s, the resolving ioctls of
each type per second, and p99 stall.

Table:
  intervals  start_ns, t_s, faults, faults_per_s, continue_per_s, copy_per_s, zeropage_per_s,
             move_per_s, poison_per_s, wake_per_s, p99_stall_ns

The ioctl rates count successful calls (ioctl rows: full mode) by their exit, whether or not a
traced thread waited for them: a migration's background stream of COPYs counts too.
Intervals are aligned to multiples of interval_s of CLOCK_MONOTONIC, by fault_ns (ioctls: by
exit_ns); t_s is the interval's start in seconds from the first one. Intervals without faults
or ioctls are listed with 0. Over several recordings (`report A B`) the table starts with the
`source`, and each recording has its own intervals: hosts' CLOCK_MONOTONIC clocks differ.

Panel (live viewers): faults/s and each ioctl type seen per second in the last complete second,
their peak and the last minute, per second of CLOCK_MONOTONIC (the data's own clock when
replayed: no tick()).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pandas as pd

from uffdtrace.events import SOURCE, empty_frame
from uffdtrace.plugins import Panel, Plugin, Rate, Rates, RunContext

RESOLVING = ("CONTINUE", "COPY", "ZEROPAGE", "MOVE", "POISON", "WAKE")
COLUMNS = ["start_ns", "t_s", "faults", "faults_per_s", *(f"{r.lower()}_per_s" for r in RESOLVING),
           "p99_stall_ns"]
HISTORY_S = 60


class TimelinePlugin(Plugin):
    name = "timeline"
    description = "faults/s, resolving ioctls/s by type and p99 stall per interval"
    options: ClassVar[dict[str, Any]] = {"interval_s": 1.0}
    columns = ("fault_ns", "stall_ns")

    def start(self, ctx: RunContext) -> None:
        if ctx.options["interval_s"] <= 0:
            raise ValueError("option interval_s must be positive")
        self.interval_ns = int(ctx.options["interval_s"] * 1e9)
        self._faults: dict[str | None, list[pd.DataFrame]] = {}  # per source (None: just one)
        self._ioctls: dict[str | None, list[pd.DataFrame]] = {}
        self._sourced = False
        self.keep = ctx.tables
        self._now_s: int | None = None
        self.reset()

    def reset(self) -> None:
        self._per_s: dict[str, dict[int, int]] = {"faults/s": {}}
        self._peak: dict[str, float] = {"faults/s": 0}
        self._last_s = 0  # latest second seen in the data

    def tick(self, now_ns: int) -> None:
        self._now_s = now_ns // 1_000_000_000

    def batch(self, df: pd.DataFrame) -> None:
        self._sourced |= SOURCE in df
        df = df[df["fault_ns"].notna()]
        fault_ns = df["fault_ns"].to_numpy(np.int64)
        if self.keep:
            self._keep(self._faults, df, pd.DataFrame({
                "slot": fault_ns // self.interval_ns,
                "stall_ns": df["stall_ns"].astype("Float64")}))
        self._count("faults/s", fault_ns)

    def ioctls(self, df: pd.DataFrame) -> None:
        self._sourced |= SOURCE in df
        df = df[df["ioctl"].isin(RESOLVING).fillna(False) & (df["errno"] == 0).fillna(False)
                & df["exit_ns"].notna()]
        exit_ns = df["exit_ns"].to_numpy(np.int64)
        if self.keep:
            self._keep(self._ioctls, df, pd.DataFrame({"slot": exit_ns // self.interval_ns,
                                                       "ioctl": df["ioctl"].to_numpy(object)}))
        for name in df["ioctl"].unique():
            self._count(f"{name}/s", exit_ns[(df["ioctl"] == name).to_numpy(bool)])

    def _keep(self, parts: dict[str | None, list[pd.DataFrame]], df: pd.DataFrame,
              part: pd.DataFrame) -> None:
        """`part`, rows of `df` by position, into `parts` per source."""
        if SOURCE not in df:
            parts.setdefault(None, []).append(part)
            return
        for source, rows in df.groupby(SOURCE, sort=False).indices.items():
            parts.setdefault(source, []).append(part if len(rows) == len(part) else part.iloc[rows])

    def _count(self, rate: str, instants_ns: np.ndarray) -> None:
        counts = self._per_s.setdefault(rate, {})
        self._peak.setdefault(rate, 0)
        second = pd.Series(instants_ns // 1_000_000_000)
        for s, n in second.value_counts().items():
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
        tables = []
        for source in sorted(self._faults.keys() | self._ioctls.keys(), key=lambda s: s or ""):
            table = self._intervals(self._faults.get(source, []), self._ioctls.get(source, []))
            if self._sourced:
                table.insert(0, SOURCE, pd.array([source] * len(table), dtype="string"))
            tables.append(table)
        if not tables:
            return {"intervals": pd.DataFrame(columns=[SOURCE, *COLUMNS] if self._sourced
                                              else COLUMNS)}
        return {"intervals": pd.concat(tables, ignore_index=True)}

    def _intervals(self, faults: list[pd.DataFrame], ioctls: list[pd.DataFrame]) -> pd.DataFrame:
        """The intervals of one recording."""
        faults = [p for p in faults if not p.empty]
        ioctls = [p for p in ioctls if not p.empty]
        if not faults and not ioctls:
            return pd.DataFrame(columns=COLUMNS)
        f = pd.concat(faults or [empty_frame({"slot": "int64", "stall_ns": "Float64"})], ignore_index=True)
        io = pd.concat(ioctls or [empty_frame({"slot": "int64", "ioctl": "object"})], ignore_index=True)
        used = pd.concat([f["slot"], io["slot"]]).astype(np.int64)
        slots = np.arange(used.min(), used.max() + 1)
        g = f.groupby("slot")
        per_slot = pd.DataFrame({"faults": g.size(), "p99": g["stall_ns"].quantile(0.99)}).reindex(slots)
        by_type = io.groupby(["slot", "ioctl"]).size().unstack(fill_value=0).reindex(slots, fill_value=0)
        seconds = self.interval_ns / 1e9
        faults_n = per_slot["faults"].fillna(0).astype(np.int64).to_numpy()
        out = {"start_ns": slots * self.interval_ns, "t_s": (slots - slots[0]) * seconds,
               "faults": faults_n, "faults_per_s": faults_n / seconds}
        for r in RESOLVING:
            n = by_type[r].to_numpy(np.float64) if r in by_type else np.zeros(len(slots))
            out[f"{r.lower()}_per_s"] = n / seconds
        out["p99_stall_ns"] = per_slot["p99"].round().astype("Int64").to_numpy()
        return pd.DataFrame(out, columns=COLUMNS)


