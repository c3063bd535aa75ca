"""Run summary: counts by backing x kind, latency percentiles, losses and the tracer's cost."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

PERCENTILES = (50, 90, 99)


@dataclass
class FaultStats:
    """Accumulates what the summary needs from every batch (a sink)."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    errnos: dict[int, int] = field(default_factory=dict)
    _stall: list[np.ndarray] = field(default_factory=list)
    _continue: list[np.ndarray] = field(default_factory=list)

    def write(self, faults: pd.DataFrame) -> None:
        if faults.empty:
            return
        keys = faults[["backing", "kind"]].fillna("unknown")
        for (b, k), n in keys.value_counts().items():
            self.counts[(b, k)] = self.counts.get((b, k), 0) + int(n)
        for o, n in faults["outcome"].value_counts().items():
            self.outcomes[o] = self.outcomes.get(o, 0) + int(n)
        for e, n in faults["errno"].dropna().value_counts().items():
            if e:
                self.errnos[int(e)] = self.errnos.get(int(e), 0) + int(n)
        self._stall.append(faults["stall_ns"].dropna().to_numpy(dtype=np.int64))
        self._continue.append(faults["continue_ns"].dropna().to_numpy(dtype=np.int64))

    def close(self) -> None:
        pass

    @property
    def faults(self) -> int:
        return sum(self.counts.values())

    def latency(self, which: str) -> dict[str, int | None]:
        parts = self._stall if which == "stall" else self._continue
        values = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        out: dict[str, int | None] = {"count": int(values.size)}
        for p in PERCENTILES:
            out[f"p{p}_ns"] = int(np.percentile(values, p)) if values.size else None
        out["max_ns"] = int(values.max()) if values.size else None
        return out


def format_us(ns: int | None) -> str:
    return "-" if ns is None else f"{ns / 1000:.1f}"
