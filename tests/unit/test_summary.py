"""The run summary's FaultStats: exact counts, and latency percentiles in bounded memory (exact
up to a limit, then a log-linear histogram within a stated error), against numpy."""

from __future__ import annotations

import io

import numpy as np
import pytest

from tests.unit.batches import faults
from uffdtrace.summary import HISTOGRAM_ERROR, PERCENTILES, FaultStats, Quantiles, print_summary


def lognormal(n: int, seed: int = 0) -> np.ndarray:
    """Stall-like ns durations: around 15 us, a long tail, a few zeros."""
    v = np.random.default_rng(seed).lognormal(np.log(15_000), 1.2, n).astype(np.int64)
    v[:10] = 0
    return v


def test_exact_under_the_limit():
    v = lognormal(50_000)
    q = Quantiles(exact=100_000)
    for part in np.array_split(v, 7):
        q.add(part)
    assert q.is_exact and q.count == v.size and (q.min, q.max) == (0, v.max())
    for p in (0, 1, 50, 90, 99, 99.9, 100):
        assert q.percentile(p) == int(np.percentile(v, p))


@pytest.mark.parametrize("data", ["lognormal", "uniform", "two_modes"])
def test_past_the_limit_a_histogram_within_its_error(data):
    rng = np.random.default_rng(1)
    v = {"lognormal": lognormal(300_000, seed=2),
         "uniform": rng.integers(1, 10_000_000_000, 300_000),
         "two_modes": np.concatenate([rng.integers(3_000, 3_100, 200_000),
                                      rng.integers(2_000_000, 2_100_000, 100_000)])}[data]
    q = Quantiles(exact=100_000)
    for part in np.array_split(v, 40):
        q.add(part)
    assert not q.is_exact and q.count == v.size and (q.min, q.max) == (v.min(), v.max())
    assert q._bins.sum() == v.size  # every value counted once, the exact ones too
    for p in (0, 0.1, 1, 25, 50, 66.6, 90, 99, 99.9, 99.99, 100):
        truth = np.percentile(v, p, method="inverted_cdf")  # the nearest-rank value
        assert abs(q.percentile(p) - truth) <= HISTOGRAM_ERROR * truth + 1, (p, truth)


def test_memory_is_bounded():
    q = Quantiles(exact=1000)
    for _ in range(50):
        q.add(lognormal(10_000))
    assert q._values is None and q._bins.nbytes == Quantiles.BINS * 8
    assert Quantiles.BINS * 8 <= 32 * 1024


def test_empty():
    q = Quantiles()
    q.add(np.zeros(0, dtype=np.int64))
    assert q.count == 0 and q.percentile(50) is None and q.max is None


def test_fault_stats_counts_exactly_and_says_how_percentiles_were_made():
    stats = FaultStats()
    stats.stall.exact = stats.cont.exact = 4  # past the limit within a few rows
    stats.write(faults(backing=["shmem", "shmem", None], kind=["minor", "minor", "missing"],
                       outcome=["resolved", "no_wait", "resolved"], errno=[0, 17, None],
                       stall_ns=[1000, None, 3000], continue_ns=[10, 20, None]))
    assert stats.latency("stall") == {"count": 2, "p50_ns": 2000, "p90_ns": 2800,  # numpy's
                                      "p99_ns": 2980, "max_ns": 3000, "percentiles": "exact"}
    stats.write(faults(backing="hugetlb", kind="minor", outcome="resolved", errno=17,
                       stall_ns=[2000, 2000, 2000], continue_ns=[30, 30, 30]))
    assert stats.faults == 6
    assert stats.counts == {("shmem", "minor"): 2, ("unknown", "missing"): 1,
                            ("hugetlb", "minor"): 3}
    assert stats.outcomes == {"resolved": 5, "no_wait": 1}
    assert stats.errnos == {17: 4} and all(type(e) is int for e in stats.errnos)
    stall = stats.latency("stall")
    assert stall["count"] == 5 and stall["max_ns"] == 3000 and stall["percentiles"] == "histogram"
    assert abs(stall["p50_ns"] - 2000) <= HISTOGRAM_ERROR * 2000 + 1
    assert set(stall) == {"count", "max_ns", "percentiles", *(f"p{p}_ns" for p in PERCENTILES)}


def test_summary_says_when_percentiles_are_approximate():
    exact = {"count": 3, "p50_ns": 1000, "p90_ns": 2000, "p99_ns": 3000, "max_ns": 3000,
             "percentiles": "exact"}
    summary = {"faults": 3, "backend": "tracepoint", "mode": "full", "hooks": {},
               "by_backing_kind": [], "stall": {**exact, "percentiles": "histogram"},
               "continue": exact, "errnos": {}, "outcomes": {}, "messages_matched_by_address": 0,
               "messages_unmatched": 0, "uffd_ranges_at_start": [], "uffd_events": [],
               "lost": {}, "lost_total": 0, "bpf_run_ns": 0, "bpf_run_cnt": 0,
               "tracer_cpu_s": 0.0, "wall_s": 1.0, "startup_s": 0.0, "compile_s": 0.0}
    out = io.StringIO()
    print_summary(summary, out)
    lines = out.getvalue().splitlines()
    assert next(line for line in lines if "stall us" in line).endswith(
        f"(n=3; percentiles within {HISTOGRAM_ERROR:.1%})")
    assert next(line for line in lines if "continue us" in line).endswith("(n=3)")
