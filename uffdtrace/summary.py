"""Run summary: counts by backing x kind, latency percentiles, losses and the tracer's cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

import numpy as np
import pandas as pd

from uffdtrace.probes.records import LOST_REASONS, UFFD_EVENTS

if TYPE_CHECKING:
    from uffdtrace.session import Session
    from uffdtrace.targets import LaunchedCommand

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
              f"  p99 {format_us(lat['p99_ns'])}  max {format_us(lat['max_ns'])}  (n={lat['count']})")
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
