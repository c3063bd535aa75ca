"""`top --mode stats`: panels drawn from a StatsFeed's aggregates instead of per-fault rows.

It stands where `top` puts its plugin host (the TUI asks it for `panels()`, `failed`,
`reset()`). The panels that need per-fault rows (latency percentiles per path, blocked
threads, the timeline, misuse, QEMU's vCPUs) say so in one text panel.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from uffdtrace.plugins import Histogram, Panel, Rate, Rates, Table, Text
from uffdtrace.probes.records import STATS_BUCKETS
from uffdtrace.stats import HISTOGRAMS, StatsFeed

HISTORY = 60  # samples of each rate kept for its sparkline
ROWS_ONLY = "latency percentiles, blocked threads, timeline, misuse, QEMU vCPUs"


class StatsPanels:
    # what top reads of a plugin host: no plugin runs here, so none fails, is cut or skips rows
    failed: tuple[str, ...] = ()
    cut = False
    skipped_rows: dict[str, int] = {}  # noqa: RUF012  (read only)

    def __init__(self) -> None:
        self.feed: StatsFeed | None = None  # set once the session has started
        self.reset()

    def reset(self) -> None:
        """Panels start afresh: what the aggregates hold now becomes the baseline."""
        self._baseline = self._snapshot() if self.feed is not None else ({}, {})
        self._rates: dict[str, deque[float]] = {}
        self._last: tuple[float, dict[str, int]] | None = None

    def _snapshot(self) -> tuple[dict, dict]:
        agg = self.feed.aggregates
        with agg.lock:
            return ({labels: (s.faults, s.stall_ns, s.buckets.copy()) for labels, s in agg.faults.items()},
                    {labels: (s.calls, s.total_ns) for labels, s in agg.ioctls.items()})

    def panels(self) -> dict[str, list[Panel]]:
        if self.feed is None:
            return {}
        now_faults, now_ioctls = self._snapshot()
        base_faults, base_ioctls = self._baseline
        zero = (0, 0, np.zeros((len(HISTOGRAMS), STATS_BUCKETS), np.int64))
        faults = {labels: tuple(a - b for a, b in zip(v, base_faults.get(labels, zero), strict=True))
                  for labels, v in now_faults.items()}
        ioctls = {labels: tuple(a - b for a, b in zip(v, base_ioctls.get(labels, (0, 0)), strict=True))
                  for labels, v in now_ioctls.items()}
        at = {name: i for i, name in enumerate(self.feed.aggregates.labels)}
        buckets = sum((b for _, _, b in faults.values()), zero[2])
        views = tuple(self._histogram(name, buckets[i]) for i, name in enumerate(HISTOGRAMS))
        by_path: dict[str, int] = {}
        processes: dict[str, list[int]] = {}
        for labels, (n, stall_ns, _) in faults.items():
            path = " ".join(labels[at[k]] or "?" for k in ("backing", "kind") if k in at) or "all"
            by_path[path] = by_path.get(path, 0) + n
            who = " ".join(labels[at[k]] for k in ("comm", "pid") if k in at) or "all"
            row = processes.setdefault(who, [0, 0])
            row[0] += n
            row[1] += stall_ns
        ioctl_rows = tuple((*labels[-2:], n, total // n if n else 0)
                           for labels, (n, total) in sorted(ioctls.items()) if n)
        return {"stats": [
            Panel("stall", views),
            Panel("rates", (Rates("faults/s by backing x kind", self._rate_views(by_path)),)),
            Panel("processes", (Table("processes (in-kernel aggregates)", ("process", "faults", "blocked_ns"),
                                      tuple((who, n, ns) for who, (n, ns) in processes.items() if n),
                                      sort=2),)),
            Panel("ioctls", (Table("uffd ioctls", ("ioctl", "errno", "calls", "mean_ns"), ioctl_rows,
                                   sort=2),)),
            Panel("rows", (Text("--mode stats", (
                "BPF keeps histograms and counters only: no per-fault rows.",
                f"Panels that need them ({ROWS_ONLY}): --mode light or full.")),)),
        ]}

    @staticmethod
    def _histogram(name: str, counts: np.ndarray) -> Histogram:
        used = np.flatnonzero(counts)
        if not used.size:
            return Histogram(f"{name.replace('_', '-')} (in-kernel)", (1.0, 2.0), (0,), "us", "none yet")
        lo, hi = int(used[0]), int(used[-1]) + 1
        n = int(counts.sum())
        cum = np.cumsum(counts)
        p50, p99 = (1 << int(np.searchsorted(cum, q * n)) for q in (0.5, 0.99))
        return Histogram(f"{name.replace('_', '-')} (in-kernel)",
                         tuple(float(1 << b) for b in range(lo, hi + 1)),
                         tuple(int(c) for c in counts[lo:hi]), "us",
                         f"n={n}  p50 in [{p50}, {2 * p50}) us  p99 in [{p99}, {2 * p99}) us")

    def _rate_views(self, totals: dict[str, int]) -> tuple[Rate, ...]:
        now = time.monotonic()
        if self._last is not None and now > self._last[0]:
            span = now - self._last[0]
            for path, n in totals.items():
                history = self._rates.setdefault(path, deque(maxlen=HISTORY))
                history.append((n - self._last[1].get(path, 0)) / span)
        self._last = (now, dict(totals))
        return tuple(Rate(path, h[-1], max(h), tuple(h)) for path, h in sorted(self._rates.items()) if h)
