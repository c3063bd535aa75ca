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
        fault_ns = df["fault_ns"].to_numpy(np.int64, na_value=-1)
        known = fault_ns >= 0
        if self.keep:
            self._keep(self._faults, df[known], pd.DataFrame({
                "slot": fault_ns[known] // self.interval_ns,
                "stall_ns": df["stall_ns"].astype("Float64").to_numpy()[known]}))
        self._count("faults/s", fault_ns[known])

    def ioctls(self, df: pd.DataFrame) -> None:
        self._sourced |= SOURCE in df
        exit_ns = df["exit_ns"].to_numpy(np.int64, na_value=-1)
        ok = (df["errno"].to_numpy(np.int64, na_value=-1) == 0) & (exit_ns >= 0)
        codes, names = pd.factorize(df["ioctl"])
        resolving = [i for i, name in enumerate(names) if name in RESOLVING]
        for i in resolving:
            self._count(f"{names[i]}/s", exit_ns[ok & (codes == i)])
        if self.keep:
            rows = ok & np.isin(codes, resolving)
            self._keep(self._ioctls, df[rows], pd.DataFrame({
                "slot": exit_ns[rows] // self.interval_ns,
                "ioctl": df["ioctl"].to_numpy(object)[rows]}))

    def _keep(self, parts: dict[str | None, list[pd.DataFrame]], df: pd.DataFrame,
              part: pd.DataFrame) -> None:
        """`part`, rows of `df` by position, into `parts` per source."""
        if SOURCE not in df:
            parts.setdefault(None, []).append(part)
            return
        for source, rows in df.groupby(SOURCE, sort=False).indices.items():
            parts.setdefault(source, []).append(part if len(rows) == len(part) else part.iloc[rows])

    def _count(self, rate: str, instants_ns: np.ndarray) -> None:
        if not instants_ns.size:
            return
        counts = self._per_s.setdefault(rate, {})
        self._peak.setdefault(rate, 0)
        seconds, n = np.unique(instants_ns // 1_000_000_000, return_counts=True)
        for s, k in zip(seconds.tolist(), n.tolist(), strict=True):
            counts[s] = counts.get(s, 0) + k
        self._last_s = max(self._last_s, seconds[-1].item())

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


