"""Run summary: counts by backing x kind, latency percentiles, losses and the tracer's cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

import numpy as np
import pandas as pd

from uffdtrace.aggregate import add_counts
from uffdtrace.probes.records import LOST_REASONS, UFFD_EVENTS

if TYPE_CHECKING:
    from uffdtrace.session import Session
    from uffdtrace.targets import LaunchedCommand

PERCENTILES = (50, 90, 99)
EXACT_VALUES = 1 << 20  # values kept as they are; past them, a log-linear histogram
SUB_BINS = 64  # histogram bins per power of two: each 2^(1/64) wide, about 1.1 %
HISTOGRAM_ERROR = 2 ** (0.5 / SUB_BINS) - 1  # its percentiles' relative error: at most 0.55 %


class Quantiles:
    """Percentiles of a stream of non-negative ns durations, in bounded memory.

    Up to `exact` values are kept, and percentiles are exact (numpy's linear interpolation).
    Past that, every value goes into a fixed log-linear histogram (SUB_BINS bins per power of
    two, 32 KiB) and a percentile is the middle of the bin of the nearest-rank value: within
    HISTOGRAM_ERROR of it. count, min and max stay exact either way."""

    BINS = 64 * SUB_BINS

    def __init__(self, exact: int = EXACT_VALUES) -> None:
        self.exact = exact
        self.count = 0
        self.min: int | None = None
        self.max: int | None = None
        self._values: list[np.ndarray] | None = []  # None once the histogram took over
        self._bins: np.ndarray | None = None

    @property
    def is_exact(self) -> bool:
        return self._values is not None

    def add(self, ns: np.ndarray) -> None:
        if not ns.size:
            return
        lo, hi = int(ns.min()), int(ns.max())
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)
        self.count += ns.size
        if self._values is None:
            self._bin(ns)
        elif self.count <= self.exact:
            self._values.append(ns)
        else:  # past the exact limit: everything so far into the histogram, for good
            self._bins = np.zeros(self.BINS, dtype=np.int64)
            for part in (*self._values, ns):
                self._bin(part)
            self._values = None

    def _bin(self, ns: np.ndarray) -> None:
        index = (np.log2(np.maximum(ns, 1).astype(np.float64)) * SUB_BINS).astype(np.int64)
        self._bins += np.bincount(index, minlength=self.BINS)

    def percentile(self, q: float) -> int | None:
        """The q-th percentile (0-100) in ns; None without values."""
        if not self.count:
            return None
        if self._values is not None:
            return int(np.percentile(np.concatenate(self._values), q))
        rank = max(1, int(np.ceil(self.count * q / 100)))
        index = int(np.searchsorted(self._bins.cumsum(), rank))
        middle = round(2 ** ((index + 0.5) / SUB_BINS))
        return min(max(middle, self.min), self.max)


@dataclass
class FaultStats:
    """Accumulates what the summary needs from every batch (a sink), in bounded memory: counts
    are exact, latency percentiles are exact up to EXACT_VALUES values (see Quantiles)."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    errnos: dict[int, int] = field(default_factory=dict)
    stall: Quantiles = field(default_factory=Quantiles)
    cont: Quantiles = field(default_factory=Quantiles)

    def write(self, faults: pd.DataFrame) -> None:
        if faults.empty:
            return
        add_counts(self.counts, faults["backing"], faults["kind"], na="unknown")
        add_counts(self.outcomes, faults["outcome"])
        errnos = faults["errno"].to_numpy(dtype=np.int64, na_value=0)
        if errnos.any():
            add_counts(self.errnos, pd.Series(errnos[errnos != 0]))
        for values, into in ((faults["stall_ns"], self.stall), (faults["continue_ns"], self.cont)):
            ns = values.to_numpy(dtype=np.int64, na_value=-1)
            into.add(ns[ns >= 0])

    def close(self) -> None:
        pass

    @property
    def faults(self) -> int:
        return sum(self.counts.values())

    def latency(self, which: str) -> dict[str, int | str | None]:
        """count, p50/p90/p99 and max (ns) of "stall" or "continue", and how the percentiles
        were computed: "exact", or "histogram" (within HISTOGRAM_ERROR)."""
        q = self.stall if which == "stall" else self.cont
        return {"count": q.count, **{f"p{p}_ns": q.percentile(p) for p in PERCENTILES},
                "max_ns": q.max, "percentiles": "exact" if q.is_exact else "histogram"}


def format_us(ns: int | None) -> str:
    return "-" if ns is None else f"{ns / 1000:.1f}"


def build_summary(session: Session, info: dict, mode: str, launched: LaunchedCommand | None) -> dict:
    """The summary of a closed session (`info`: what Session.close() returned)."""
    stats = session.stats
    lost = info.get("lost", dict.fromkeys(LOST_REASONS, 0))
    return {
        "backend": session.backend.name if session.backend else "tracepoint",
        "hooks": session.backend.attached if session.backend else {},
        "mode": mode,
        "faults": stats.faults,
        "by_backing_kind": [{"backing": b, "kind": k, "faults": n}
                            for (b, k), n in sorted(stats.counts.items())],
        "outcomes": stats.outcomes,
        "errnos": {str(e): n for e, n in sorted(stats.errnos.items())},
        "stall": stats.latency("stall"),
        "continue": stats.latency("continue"),
        "stall_hist_log2_us": info.get("stall_hist", []),
        "continue_hist_log2_us": info.get("continue_hist", []),
        "lost": lost,
        "lost_total": sum(lost.values()),
        "uffd_events": [{"pid": p, "event": UFFD_EVENTS.get(e, str(e)), "count": n}
                        for (p, e), n in sorted(info.get("uffd_events", {}).items())],
        "registers": info.get("registers", []),
        "uffd_ranges_at_start": info.get("ranges_at_start", []),
        "ioctls": [{"ioctl": name, "errno": err, "count": n}
                   for (name, err), n in sorted(info.get("ioctls", {}).items())],
        "messages_matched_by_address": info.get("messages", {}).get("matched_by_address", 0),
        "messages_unmatched": info.get("messages", {}).get("unmatched", 0),
        "startup_s": round(session.startup_s, 3),
        "compile_s": round(session.backend.compile_s, 3) if session.backend else None,
        "bpf_run_ns": info.get("bpf_run_ns"),
        "bpf_run_cnt": info.get("bpf_run_cnt"),
        "tracer_cpu_s": round(info["tracer_cpu_s"], 3),
        "wall_s": round(info["wall_s"], 3),
        "command_exit": launched.returncode if launched else None,
    }


def print_summary(s: dict, out: TextIO) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"\n{s['faults']} faults ({s['backend']} backend, {s['mode']} mode)")
    if s["hooks"]:
        p("  kprobes: " + ", ".join(f"{hook}={symbol or 'absent'}" for hook, symbol in s["hooks"].items()))
    for row in s["by_backing_kind"]:
        p(f"  {row['backing']:>8} {row['kind']:<8} {row['faults']}")
    for name in ("stall", "continue"):
        lat = s[name]
        if lat["count"]:
            p(f"  {name:>8} us: p50 {format_us(lat['p50_ns'])}  p90 {format_us(lat['p90_ns'])}"
              f"  p99 {format_us(lat['p99_ns'])}  max {format_us(lat['max_ns'])}  (n={lat['count']}"
              + (f"; percentiles within {HISTOGRAM_ERROR:.1%})" if lat["percentiles"] == "histogram"
                 else ")"))
    if s["errnos"]:
        p("  errnos: " + ", ".join(f"{e}x{n}" for e, n in s["errnos"].items()))
    unresolved = s["outcomes"].get("unresolved_exit", 0)
    if unresolved:
        p(f"  {unresolved} faults still in flight when their thread exited")
    if s["outcomes"].get("unresolved_end"):
        p(f"  {s['outcomes']['unresolved_end']} faults still blocked when tracing ended")
    if s["messages_matched_by_address"]:
        p(f"  {s['messages_matched_by_address']} fault messages named no thread (no "
          "UFFD_FEATURE_THREAD_ID): matched to their faults by address space and page")
    if s["messages_unmatched"]:
        p(f"  {s['messages_unmatched']} fault messages matched no traced fault (an untraced "
          "thread's, or read after the fault had ended)")
    for r in s["uffd_ranges_at_start"]:
        p(f"  registered before tracing: pid {r['pid']} {r['start']:#x}+{r['len']:#x} "
          f"{'|'.join(r['modes'])}")
    for ev in s["uffd_events"]:
        p(f"  uffd event {ev['event']} in pid {ev['pid']}: {ev['count']}")
    lost = ", ".join(f"{k}={v}" for k, v in s["lost"].items() if v) or "none"
    p(f"  lost events: {s['lost_total']} ({lost})")
    run_ms = (s["bpf_run_ns"] or 0) / 1e6
    p(f"  tracer cost: BPF {run_ms:.1f} ms in {s['bpf_run_cnt'] or 0} runs, process CPU "
      f"{s['tracer_cpu_s']:.2f} s over {s['wall_s']:.2f} s; start-up {s['startup_s']:.2f} s "
      f"(compile {s['compile_s']} s)")
