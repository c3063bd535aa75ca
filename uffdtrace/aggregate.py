"""Vectorised building blocks for plugins: counts per key, log2 histograms of durations (also
per group) and the overlap of per-thread blocked intervals."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

SUB_BUCKETS = 16  # per power of two in LogHistogram: percentiles within ~4 %


def distinct_rows(*parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows told apart by the values of `parts` (columns of equal length): each row's group,
    and each group's first row. Hashing each part beats sorting whole rows
    (np.unique(axis=0)) several times over."""
    code = np.zeros(len(parts[0]), dtype=np.int64)
    for part in parts:
        codes, uniques = pd.factorize(part)
        code = code * len(uniques) + codes  # < rows ** len(parts): no overflow for a batch
    group, groups = pd.factorize(code)
    first = np.empty(len(groups), dtype=np.int64)
    first[group[::-1]] = np.arange(len(group) - 1, -1, -1)  # the last write, the first row, wins
    return group, first


def add_counts(into: dict[Any, int], *columns: pd.Series, na: Any = None) -> None:
    """Add to `into` how many rows have each combination of the columns' values (a value, or a
    tuple of values for several columns). An empty value counts as `na`; rows with one are
    left out when `na` is None. One factorize per column: no Python per row."""
    codes, uniques = [], []
    for column in columns:
        code, unique = pd.factorize(column)
        values = pd.Index(unique).tolist()  # Python scalars
        if na is None:
            codes.append(code)
            uniques.append(values)
        else:  # empty (code -1) becomes the first value: `na`
            codes.append(code + 1)
            uniques.append([na, *values])
    shape = tuple(len(u) for u in uniques)
    known = np.logical_and.reduce([c >= 0 for c in codes])
    flat = np.ravel_multi_index([c[known] for c in codes], shape)
    counts = np.bincount(flat, minlength=int(np.prod(shape)))
    for i in np.flatnonzero(counts):
        key = tuple(u[j] for u, j in zip(uniques, np.unravel_index(i, shape), strict=True))
        key = key if len(key) > 1 else key[0]
        into[key] = into.get(key, 0) + int(counts[i])


def log2_us_buckets(ns: np.ndarray) -> np.ndarray:
    """Bucket index of each duration: floor(log2(us)), with anything under 2 us in bucket 0."""
    us = np.maximum(ns // 1000, 1)
    return np.frexp(us.astype(np.float64))[1] - 1


class LogHistogram:
    """Running counts of ns durations in log-linear bins: cheap to add to, percentiles within
    a few percent. Groups: one histogram per row of `counts`."""

    BINS = 64 * SUB_BUCKETS

    def __init__(self, groups: int = 1) -> None:
        self.counts = np.zeros((groups, self.BINS), dtype=np.int64)

    def grow(self, groups: int) -> None:
        """Have at least `groups` groups (new ones empty)."""
        more = groups - len(self.counts)
        if more > 0:
            self.counts = np.vstack([self.counts, np.zeros((more, self.BINS), dtype=np.int64)])

    def add(self, ns: np.ndarray, group: np.ndarray | None = None) -> None:
        """Count durations `ns` (into group 0, or each into its `group`)."""
        fine = np.log2(np.maximum(ns, 1).astype(np.float64)) * SUB_BUCKETS
        index = fine.astype(np.int64) + (0 if group is None else group * self.BINS)
        self.counts += np.bincount(index, minlength=self.counts.size).reshape(self.counts.shape)

    def percentile(self, q: float) -> np.ndarray:
        """Per group: the q-th percentile in ns (geometric middle of its bin; 0 when empty)."""
        cum = self.counts.cumsum(axis=1)
        rank = np.ceil(cum[:, -1] * q / 100).clip(1)
        index = (cum < rank[:, None]).sum(axis=1)
        return np.where(cum[:, -1] > 0, 2 ** ((index + 0.5) / SUB_BUCKETS), 0)



def merge_intervals(pid: np.ndarray, tid: np.ndarray, start: np.ndarray, end: np.ndarray,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The union of [start, end) per thread, as disjoint intervals (pid, start, end) sorted by
    pid."""
    if not pid.size:
        return pid, start, end
    order = np.lexsort((start, tid, pid))
    pid, tid, start, end = pid[order], tid[order], start[order], end[order]
    same = np.zeros(pid.size, dtype=bool)
    same[1:] = (pid[1:] == pid[:-1]) & (tid[1:] == tid[:-1])
    thread = np.cumsum(~same)
    reach = pd.Series(end).groupby(thread).cummax().to_numpy()  # furthest end so far
    new = ~same
    new[1:] |= start[1:] > reach[:-1]
    first = np.flatnonzero(new)
    return pid[first], start[first], np.maximum.reduceat(end, first)


def all_blocked_ns(start: np.ndarray, end: np.ndarray, threads: int) -> int:
    """Time covered by `threads` of the (per-thread disjoint) intervals at once."""
    if threads == 0 or start.size < threads:
        return 0
    times = np.concatenate([start, end])
    delta = np.concatenate([np.ones(start.size, np.int64), -np.ones(end.size, np.int64)])
    order = np.lexsort((delta, times))  # at equal times ends go first: intervals are half-open
    times, depth = times[order], np.cumsum(delta[order])
    return int(np.diff(times)[depth[:-1] == threads].sum())
