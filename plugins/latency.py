"""Latency distributions per backing x kind: log2 microsecond histograms and exact percentiles.

Tables:
  percentiles  backing, kind, metric, count, p50_ns, p90_ns, p99_ns, p99_9_ns, max_ns
  histogram    backing, kind, metric, bucket, lo_us, hi_us, count  (non-empty buckets only)

Bucket N counts values in [2^N, 2^(N+1)) us, like QEMU's postcopy-latency-dist; values under
1 us fall in bucket 0. Percentiles are exact (linear interpolation over every value kept).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from uffdtrace.plugins import Plugin, RunContext

METRICS = ("stall_ns", "notify_ns", "handler_ns", "continue_ns", "wake_to_run_ns")
PERCENTILES = {"p50_ns": 50, "p90_ns": 90, "p99_ns": 99, "p99_9_ns": 99.9}


def log2_us_buckets(ns: np.ndarray) -> np.ndarray:
    """Bucket index of each duration: floor(log2(us)), with anything under 2 us in bucket 0."""
    us = np.maximum(ns // 1000, 1)
    return np.frexp(us.astype(np.float64))[1] - 1


class LatencyPlugin(Plugin):
    name = "latency"
    description = ("log2 us histograms and p50/p90/p99/p99.9/max of every latency, per "
                   "backing x kind")
    columns = ("backing", "kind", *METRICS)

    def start(self, ctx: RunContext) -> None:
        self._values: dict[tuple[str, str, str], list[np.ndarray]] = {}

    def batch(self, df: pd.DataFrame) -> None:
        groups = df.groupby([df["backing"].fillna("unknown"), df["kind"].fillna("unknown")],
                            sort=False).indices
        for metric in METRICS:
            col = df[metric]
            values = col.to_numpy(dtype=np.int64, na_value=-1)
            if not col.hasnans:
                for key, idx in groups.items():
                    self._values.setdefault((*key, metric), []).append(values[idx])
                continue
            for key, idx in groups.items():
                v = values[idx]
                self._values.setdefault((*key, metric), []).append(v[v >= 0])

    def finish(self) -> dict[str, pd.DataFrame]:
        pct_rows, hist_rows = [], []
        for (backing, kind, metric), parts in sorted(self._values.items()):
            v = np.concatenate(parts)
            if not v.size:
                continue
            q = np.percentile(v, list(PERCENTILES.values()))
            pct_rows.append({"backing": backing, "kind": kind, "metric": metric,
                             "count": v.size, **dict(zip(PERCENTILES, q.astype(np.int64),
                                                         strict=True)),
                             "max_ns": int(v.max())})
            counts = np.bincount(log2_us_buckets(v))
            for bucket in np.flatnonzero(counts):
                hist_rows.append({"backing": backing, "kind": kind, "metric": metric,
                                  "bucket": int(bucket), "lo_us": 1 << int(bucket),
                                  "hi_us": 1 << (int(bucket) + 1), "count": int(counts[bucket])})
        pct_cols = ["backing", "kind", "metric", "count", *PERCENTILES, "max_ns"]
        hist_cols = ["backing", "kind", "metric", "bucket", "lo_us", "hi_us", "count"]
        return {"percentiles": pd.DataFrame(pct_rows, columns=pct_cols),
                "histogram": pd.DataFrame(hist_rows, columns=hist_cols)}
