"""Latency distributions per backing x kind: log2 microsecond histograms and exact percentiles.

Tables:
  percentiles  backing, kind, metric, count, p50_ns, p90_ns, p99_ns, p99_9_ns, max_ns
  histogram    backing, kind, metric, bucket, lo_us, hi_us, count  (non-empty buckets only)

Bucket N counts values in [2^N, 2^(N+1)) us, like QEMU's postcopy-latency-dist; values under
1 us fall in bucket 0. Percentiles are exact (linear interpolation over every value kept): the
tables keep every value, 8 bytes per fault and metric (`report`, `record --plugin latency`).
A live viewer wants no tables, and keeps only fixed-size histograms.
Over several recordings (`report A B`) both tables start with their `source`: each recording's
distributions apart.

Panels (live viewers): the log2 us histogram of stall (views: notify, wake-to-run) and of
CONTINUE (views: handler), with approximate percentiles, and faults per backing x kind.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from uffdtrace.aggregate import LogHistogram, add_counts, log2_us_buckets
from uffdtrace.events import SOURCE
from uffdtrace.plugins import Histogram, Panel, Plugin, RunContext, Table

METRICS = ("stall_ns", "notify_ns", "handler_ns", "continue_ns", "wake_to_run_ns")
PERCENTILES = {"p50_ns": 50, "p90_ns": 90, "p99_ns": 99, "p99_9_ns": 99.9}
PANEL_VIEWS = {"stall": ("stall_ns", "notify_ns", "wake_to_run_ns"),
               "continue": ("continue_ns", "handler_ns")}
def histogram_view(title: str, counts: np.ndarray, hist: LogHistogram) -> Histogram:
    """A Histogram panel view of log2 us bucket `counts` (the non-empty range), with
    percentiles from `hist`."""
    used = np.flatnonzero(counts)
    lo, hi = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 0)
    n = int(counts.sum())
    p50, p99 = hist.percentile(50)[0], hist.percentile(99)[0]
    note = f"n={n}  p50 {p50 / 1000:.1f}us  p99 {p99 / 1000:.1f}us" if n else "no faults yet"
    return Histogram(title, tuple(float(1 << b) for b in range(lo, hi + 1)),
                     tuple(int(c) for c in counts[lo:hi]), "us", note)


class LatencyPlugin(Plugin):
    name = "latency"
    description = ("log2 us histograms and p50/p90/p99/p99.9/max of every latency, per "
                   "backing x kind")
    columns = ("backing", "kind", *METRICS)

    def start(self, ctx: RunContext) -> None:
        self._values: dict[tuple[str, ...], list[np.ndarray]] = {}  # ([source,] backing, kind, metric)
        self._sourced = False
        self.keep = ctx.tables
        self.reset()

    def reset(self) -> None:
        self._live = {m: LogHistogram() for m in METRICS}
        self._log2 = {m: np.zeros(64, dtype=np.int64) for m in METRICS}
        self._kinds: dict[tuple[str, str], int] = {}

    def batch(self, df: pd.DataFrame) -> None:
        for metric in METRICS:
            values = df[metric].to_numpy(dtype=np.int64, na_value=-1)
            known = values[values >= 0]
            self._live[metric].add(known)
            self._log2[metric] += np.bincount(log2_us_buckets(known), minlength=64)
        add_counts(self._kinds, df["backing"], df["kind"], na="unknown")
        if self.keep:
            self._tabulate(df)

    def _tabulate(self, df: pd.DataFrame) -> None:
        """Keep every value per ([source,] backing, kind, metric), for the exact tables."""
        by = [df["backing"].fillna("unknown"), df["kind"].fillna("unknown")]
        if SOURCE in df:  # tables per recording; the panels' counts over all of them
            by.insert(0, df[SOURCE])
            self._sourced = True
        groups = df.groupby(by, sort=False).indices
        for metric in METRICS:
            values = df[metric].to_numpy(dtype=np.int64, na_value=-1)
            for key, idx in groups.items():
                v = values[idx]
                self._values.setdefault((*key, metric), []).append(v[v >= 0])

    def panels(self) -> list[Panel]:
        kinds = Table("backing x kind", ("backing", "kind", "faults"),
                      tuple((*k, n) for k, n in sorted(self._kinds.items())), sort=2)
        return [Panel(name, tuple(histogram_view(m.removesuffix("_ns").replace("_", "-") + " latency",
                                                 self._log2[m], self._live[m]) for m in metrics))
                for name, metrics in PANEL_VIEWS.items()] + [Panel("kinds", (kinds,))]

    def finish(self) -> dict[str, pd.DataFrame]:
        pct_rows, hist_rows = [], []
        group = [SOURCE, "backing", "kind", "metric"] if self._sourced else ["backing", "kind", "metric"]
        for key, parts in sorted(self._values.items()):
            v = np.concatenate(parts)
            if not v.size:
                continue
            named = dict(zip(group, key, strict=True))
            q = np.percentile(v, list(PERCENTILES.values()))
            pct_rows.append({**named, "count": v.size,
                             **dict(zip(PERCENTILES, q.astype(np.int64), strict=True)),
                             "max_ns": int(v.max())})
            counts = np.bincount(log2_us_buckets(v))
            for bucket in np.flatnonzero(counts):
                hist_rows.append({**named, "bucket": int(bucket), "lo_us": 1 << int(bucket),
                                  "hi_us": 1 << (int(bucket) + 1), "count": int(counts[bucket])})
        pct_cols = [*group, "count", *PERCENTILES, "max_ns"]
        hist_cols = [*group, "bucket", "lo_us", "hi_us", "count"]
        return {"percentiles": pd.DataFrame(pct_rows, columns=pct_cols),
                "histogram": pd.DataFrame(hist_rows, columns=hist_cols)}
