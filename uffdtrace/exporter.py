"""`uffdtrace export`'s metrics: the aggregates a StatsFeed keeps, and the tracer's own cost.

A scrape (prometheus_client's server thread) only formats the series under their lock, so
/metrics costs the same at any fault rate; the feed reads the kernel once per interval on the
session's thread. Metric names follow Prometheus' conventions: base units (seconds), `_total`
counters, histograms with `le` at powers of two of 1 µs (docs/grafana/ shows them).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from uffdtrace.probes.records import ROLE_HANDLER, ROLE_TARGET
from uffdtrace.session import Session
from uffdtrace.stats import BUCKET_BOUNDS_S, HISTOGRAMS, StatsFeed

NS = 1e-9
LE = [repr(b) if b != float("inf") else "+Inf" for b in BUCKET_BOUNDS_S]  # 2e-06 ... 33.554432
HELP = {
    "stall": "how long the faulting thread could not run: fault to return to user space",
    "wake_to_run": "from the wakeup of the faulting thread to it running again",
    "notify": "from the faulting thread's sleep to a handler reading its message",
    "handler": "from a handler reading the message to its resolving ioctl",
}


class Exporter(Collector):
    """The metrics of a StatsFeed's aggregates and of its session's tracer (for a registry)."""

    def __init__(self, feed: StatsFeed, session: Session) -> None:
        self.feed = feed
        self.session = session

    def collect(self) -> Iterator:
        agg, backend = self.feed.aggregates, self.session.backend
        with agg.lock:
            faults = {labels: (s.faults, s.stall_ns, s.buckets.copy()) for labels, s in agg.faults.items()}
            ioctls = {labels: (s.calls, s.total_ns, s.buckets.copy()) for labels, s in agg.ioctls.items()}
            events = dict(self.feed.events)
            dropped = agg.dropped
        labels = list(agg.labels)

        total = CounterMetricFamily("uffdtrace_faults", "userfaultfd faults of traced processes",
                                    labels=labels)
        blocked = CounterMetricFamily("uffdtrace_blocked_seconds",
                                      "time faulting threads could not run (the stalls' sum)", labels=labels)
        for values, (n, stall_ns, _) in faults.items():
            total.add_metric(values, n)
            blocked.add_metric(values, stall_ns * NS)
        yield total
        yield blocked
        for i, name in enumerate(HISTOGRAMS):
            hist = HistogramMetricFamily(f"uffdtrace_fault_{name}_seconds", HELP[name], labels=labels)
            for values, (_, stall_ns, buckets) in faults.items():
                if buckets[i].any():
                    hist.add_metric(values, _cumulative(buckets[i]),
                                    stall_ns * NS if name == "stall" else None)
            yield hist

        ioctl_labels = [*agg.ioctl_labels, "ioctl", "errno"]
        calls = CounterMetricFamily("uffdtrace_ioctls", "uffd ioctls by command and errno (0: success)",
                                    labels=ioctl_labels)
        latency: dict[tuple[str, ...], tuple[np.ndarray, int]] = {}
        for values, (n, total_ns, buckets) in ioctls.items():
            calls.add_metric(values, n)
            buckets_so_far, ns_so_far = latency.get(values[:-1], (0, 0))
            latency[values[:-1]] = (buckets_so_far + buckets, ns_so_far + total_ns)
        yield calls
        seconds = HistogramMetricFamily("uffdtrace_ioctl_seconds", "uffd ioctls' duration",
                                        labels=ioctl_labels[:-1])
        for values, (buckets, total_ns) in latency.items():
            seconds.add_metric(values, _cumulative(buckets), total_ns * NS)
        yield seconds

        uffd_events = CounterMetricFamily("uffdtrace_uffd_events", "non-fault uffd events read by handlers",
                                          labels=["comm", "event"])
        for values, count in events.items():
            uffd_events.add_metric(values, count)
        yield uffd_events

        now_ns = time.monotonic_ns()
        stuck = self.session.blocked
        yield GaugeMetricFamily("uffdtrace_faults_blocked", "faults whose thread sleeps in one now",
                                value=len(stuck))
        yield GaugeMetricFamily("uffdtrace_oldest_blocked_fault_age_seconds",
                                "age of the oldest fault blocked now (0: none)",
                                value=(now_ns - stuck[0].fault_ns) * NS if stuck else 0.0)
        lost = CounterMetricFamily("uffdtrace_lost_events", "faults or ioctls the BPF side could not count",
                                   labels=["reason"])
        for reason, n in backend.lost().items():
            lost.add_metric([reason], n)
        yield lost
        run_s = CounterMetricFamily("uffdtrace_bpf_run_seconds", "CPU time in uffdtrace's BPF programs",
                                    labels=["program"])
        runs = CounterMetricFamily("uffdtrace_bpf_runs", "runs of uffdtrace's BPF programs",
                                   labels=["program"])
        for program, (ns, n) in backend.program_stats().items():
            run_s.add_metric([program], ns * NS)
            runs.add_metric([program], n)
        yield run_s
        yield runs
        yield GaugeMetricFamily("uffdtrace_startup_seconds", "time from start to tracing",
                                value=self.session.startup_s)
        yield GaugeMetricFamily("uffdtrace_traced_processes", "processes traced now", value=sum(
            role in (ROLE_TARGET, ROLE_HANDLER) for role in backend.tracked().values()))
        yield CounterMetricFamily("uffdtrace_series_dropped",
                                  "aggregates counted under the overflow series past --max-series "
                                  "(comm, pid, vcpu \"other\")",
                                  value=dropped)


def _cumulative(buckets: np.ndarray) -> list[tuple[str, float]]:
    return list(zip(LE, np.cumsum(buckets).tolist(), strict=True))
