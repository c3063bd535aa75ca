"""Each built-in plugin (plugins/*.py) on synthetic batches with the real columns
(uffdtrace/events.py), against numbers worked out by hand: no tracing, no root. The plugin API
and host are in test_plugin_host.py; live recordings in tests/test_plugins_live.py."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from tests.unit.batches import faults, ioctls, offline, run
from uffdtrace.aggregate import log2_us_buckets
from uffdtrace.events import FAULT_COLUMNS
from uffdtrace.plugins import Histogram, RunContext, resolve
from uffdtrace.sinks.csv import CsvSink
from uffdtrace.sinks.plugins import format_tables
from uffdtrace_plugins.blocktime import BlocktimePlugin
from uffdtrace_plugins.csv import CsvPlugin
from uffdtrace_plugins.hotpages import HotpagesPlugin
from uffdtrace_plugins.latency import LatencyPlugin
from uffdtrace_plugins.misuse import MisusePlugin
from uffdtrace_plugins.qemu import QemuPlugin
from uffdtrace_plugins.timeline import TimelinePlugin

BUILTINS = {"latency", "blocktime", "hotpages", "misuse", "timeline", "csv"}
S = 1_000_000_000
BASE = 0x7F0000000000
HUGE = 2 << 20


def live(plugin_cls, **options):
    """A plugin started as a live viewer starts it (no tables kept), fed by hand."""
    plugin = plugin_cls()
    plugin.start(RunContext(targets=("t",), backend="file", mode="", tables=False,
                            options={**plugin_cls.options, **options}))
    return plugin


def values(df: pd.DataFrame) -> list[list]:
    """Rows as lists, <NA> as None."""
    return [[None if pd.isna(v) else v for v in row] for row in df.itertuples(index=False)]


# --- latency ------------------------------------------------------------------------------


def test_log2_us_buckets():
    ns = np.array([0, 999, 1000, 1999, 2000, 3999, 4000, 1_048_575_999, 1_048_576_000])
    assert log2_us_buckets(ns).tolist() == [0, 0, 0, 0, 1, 1, 2, 19, 20]


def test_latency():
    stall = [500, 1500, 3000, 1_000_000, 5000]
    a = faults(backing="shmem", kind="minor", stall_ns=stall[:3], continue_ns=[100, None, 300])
    b = faults(backing=["shmem", "hugetlb"], kind="minor", stall_ns=stall[3:],
               continue_ns=[None, None])
    t = run(LatencyPlugin, a, b)
    pct = t["percentiles"].set_index(["backing", "kind", "metric"])
    shmem = pct.loc[("shmem", "minor", "stall_ns")]
    values = np.array(stall[:4])
    assert shmem["count"] == 4 and shmem["max_ns"] == 1_000_000
    for col, q in {"p50_ns": 50, "p90_ns": 90, "p99_ns": 99, "p99_9_ns": 99.9}.items():
        assert shmem[col] == int(np.percentile(values, q))
    assert pct.loc[("shmem", "minor", "continue_ns"), "count"] == 2
    assert pct.loc[("hugetlb", "minor", "stall_ns"), "max_ns"] == 5000
    assert ("shmem", "minor", "notify_ns") not in pct.index  # no values: no row
    hist = t["histogram"]
    shmem_stall = hist[(hist.backing == "shmem") & (hist.metric == "stall_ns")]
    assert shmem_stall[["bucket", "lo_us", "hi_us", "count"]].values.tolist() == [
        [0, 1, 2, 2], [1, 2, 4, 1], [9, 512, 1024, 1]]


def test_latency_by_hand():
    """Five stalls of shmem minor faults over two batches (one fault has none): p50 is the
    middle one; p90 lies 60 % of the way from the 4th to the 5th (rank 0.9 * 4 = 3.6), p99
    96 %, p99.9 99.6 %. Faults of unknown path are grouped as unknown."""
    a = faults(backing="shmem", kind="minor", stall_ns=[4000, 1000, None])
    b = faults(backing=["shmem", "shmem", "shmem", None], kind=["minor", "minor", "minor", None],
               stall_ns=[10_000, 3000, 2000, 700], notify_ns=[None, None, None, 5])
    t = run(LatencyPlugin, a, b)
    assert values(t["percentiles"]) == [
        ["shmem", "minor", "stall_ns", 5, 3000, 7600, 9760, 9976, 10_000],
        ["unknown", "unknown", "notify_ns", 1, 5, 5, 5, 5, 5],
        ["unknown", "unknown", "stall_ns", 1, 700, 700, 700, 700, 700],
    ]
    # 1, 2-3, 4 and 10 us; under 2 us all in bucket 0
    assert values(t["histogram"]) == [
        ["shmem", "minor", "stall_ns", 0, 1, 2, 1],
        ["shmem", "minor", "stall_ns", 1, 2, 4, 2],
        ["shmem", "minor", "stall_ns", 2, 4, 8, 1],
        ["shmem", "minor", "stall_ns", 3, 8, 16, 1],
        ["unknown", "unknown", "notify_ns", 0, 1, 2, 1],
        ["unknown", "unknown", "stall_ns", 0, 1, 2, 1],
    ]


def test_latency_panels():
    plugin = live(LatencyPlugin)
    plugin.batch(faults(backing="shmem", kind="minor", stall_ns=[4000, 1000, None]))
    plugin.batch(faults(backing=["shmem", "shmem", "shmem", None], kind=["minor", "minor", "minor", None],
                        stall_ns=[10_000, 3000, 2000, 700]))
    stall, cont, kinds = plugin.panels()
    assert [stall.name, cont.name, kinds.name] == ["stall", "continue", "kinds"]
    assert kinds.views[0].rows == (("shmem", "minor", 6), ("unknown", "unknown", 1))
    hist = stall.views[0]
    assert isinstance(hist, Histogram) and hist.title == "stall latency"
    assert (hist.edges, hist.counts) == ((1.0, 2.0, 4.0, 8.0, 16.0), (2, 2, 1, 1))
    assert hist.note.startswith("n=6  p50 ")
    assert [v.title for v in stall.views] == ["stall latency", "notify latency", "wake-to-run latency"]
    assert [v.note for v in cont.views] == ["no faults yet"] * 2
    assert plugin.finish()["percentiles"].empty  # a live viewer keeps no values for tables
    plugin.reset()
    assert plugin.panels()[2].views[0].rows == () and plugin.panels()[0].views[0].counts == ()


# --- blocktime ----------------------------------------------------------------------------


def test_blocktime_all_threads_blocked():
    # pid 1: thread 11 stalls [0,10) [20,30); thread 12 [5,15) [25,40) -> both at once 5 + 5.
    # Thread 12's overlapping record [26,28) changes nothing. pid 2: one thread -> its union.
    df = faults(pid=[1, 1, 1, 1, 1, 2, 2, 2],
                tid=[11, 12, 11, 12, 12, 21, 21, 21],
                comm=["a", "b", "a", "b", "b", "c", "c", "c"],
                fault_ns=[0, 5, 20, 25, 26, 100, 105, 200],
                resume_ns=[10, 15, 30, 40, 28, 110, 120, None],
                stall_ns=[10, 10, 10, 15, 2, 10, 15, None])
    t = run(BlocktimePlugin, df.iloc[:3], df.iloc[3:])
    threads = t["threads"].set_index("tid")
    assert threads.loc[11, ["pid", "faults", "blocked_ns"]].tolist() == [1, 2, 20]
    assert threads.loc[12, ["faults", "blocked_ns"]].tolist() == [3, 27]
    assert threads.loc[21, ["comm", "faults", "blocked_ns"]].tolist() == ["c", 3, 25]
    procs = t["processes"].set_index("pid")
    assert procs.loc[1].tolist() == [2, 5, 47, 10]  # threads, faults, blocked_ns, all_blocked_ns
    assert procs.loc[2].tolist() == [1, 3, 25, 20]


def test_blocktime_threads_that_never_overlap():
    df = faults(pid=1, tid=[1, 2, 3], fault_ns=[0, 10, 0], resume_ns=[10, 20, 20],
                stall_ns=[10, 10, 20])
    assert run(BlocktimePlugin, df)["processes"]["all_blocked_ns"].tolist() == [0]


def test_blocktime_by_hand():
    """pid 5: thread 1 stalls [0, 100); thread 2 [20, 50) and [60, 120); thread 3 [40, 70) and
    [90, 95): all three at once during [40, 50), [60, 70) and [90, 95), 25 ns. pid 6: two
    threads back to back (half-open intervals: never both at once). pid 7: one of its two
    threads never stalls (a fault without stall_ns), so never all. A row without pid counts
    for nothing."""
    df = faults(pid=[5, 5, 5, 5, 5, 6, 6, 7, 7, None],
                tid=[1, 2, 2, 3, 3, 4, 5, 8, 9, 1],
                comm=["a", "b", "b", "c", "c2", "d", "e", "f", "g", "x"],
                fault_ns=[0, 20, 60, 40, 90, 0, 10, 0, 5, 0],
                stall_ns=[100, 30, 60, 30, 5, 10, 10, 50, None, 1000])
    t = run(BlocktimePlugin, df.iloc[:4], df.iloc[4:])
    # blocked_ns sums the stalls; comm is the thread's last
    assert values(t["threads"]) == [[5, 1, "a", 1, 100], [5, 2, "b", 2, 90], [5, 3, "c2", 2, 35],
                                    [6, 4, "d", 1, 10], [6, 5, "e", 1, 10], [7, 8, "f", 1, 50],
                                    [7, 9, "g", 1, 0]]
    # pid, threads, faults, blocked_ns, all_blocked_ns
    assert values(t["processes"]) == [[5, 3, 5, 225, 25], [6, 2, 2, 20, 0], [7, 2, 2, 50, 0]]


def test_blocktime_panel():
    plugin = live(BlocktimePlugin)
    plugin.batch(faults(pid=[5, 5, 5, None], tid=[1, 2, 2, 1], comm=["a", "b", "b2", "x"],
                        fault_ns=[0, 20, 60, 0], stall_ns=[100_000, 30_000, 60_000, 5]))
    plugin.batch(faults(pid=5, tid=[1], comm="a", fault_ns=[200], stall_ns=[None]))
    (panel,) = plugin.panels()
    table = panel.views[0]
    assert table.columns == ("pid", "tid", "comm", "faults", "p50_ns", "p99_ns", "blocked_ns")
    assert [(r[0], r[1], r[2], r[3], r[6]) for r in table.rows] == [(5, 1, "a", 2, 100_000),
                                                                   (5, 2, "b2", 2, 90_000)]
    p50 = {r[1]: r[4] for r in table.rows}  # log-linear bins: within ~4 %
    assert abs(p50[1] - 100_000) < 4_000 and abs(p50[2] - 30_000) < 1_200


# --- hotpages -----------------------------------------------------------------------------


def test_hotpages():
    base = 0x7F0000000000
    addr = [base + 5, base + 4095, base + 4096, base + (2 << 20) + 1, base + 4097, None]
    df = faults(pid=[1, 1, 1, 1, 2, 1], addr=addr, page_size=4096,
                stall_ns=[10, 20, 5, 7, 1, 1])
    t = run(HotpagesPlugin, df.iloc[:2], df.iloc[2:], top=3)
    assert t["pages"].values.tolist() == [
        [1, base, 2, 30], [1, base + (2 << 20), 1, 7], [1, base + 4096, 1, 5]]
    assert t["regions"].values.tolist() == [
        [1, base, 3, 35], [1, base + (2 << 20), 1, 7], [2, base, 1, 1]]


def test_hotpages_huge_pages_and_ranking():
    """A 2 MiB page groups the faults anywhere in it. The hottest: most faults, then most
    stall, then lower pid and address. A fault without stall_ns counts with none; one without
    a page size is left out."""
    df = faults(pid=[1, 1, 1, 2, 2, 1, 3, 3],
                addr=[BASE + 10, BASE + HUGE - 1, BASE + HUGE, BASE, BASE + 3 * 4096,
                      BASE + 2 * HUGE, BASE, BASE + 5],
                page_size=[HUGE, HUGE, HUGE, 4096, 4096, HUGE, None, 4096],
                stall_ns=[10, None, 7, 3, 4, 7, 99, 1])
    t = run(HotpagesPlugin, df, top=4)
    assert values(t["pages"]) == [[1, BASE, 2, 10], [1, BASE + HUGE, 1, 7], [1, BASE + 2 * HUGE, 1, 7],
                                  [2, BASE + 3 * 4096, 1, 4]]
    assert values(t["regions"]) == [[1, BASE, 2, 10], [1, BASE + HUGE, 1, 7],
                                    [1, BASE + 2 * HUGE, 1, 7], [2, BASE, 2, 7], [3, BASE, 1, 1]]


def test_hotpages_merging_partial_sums_changes_nothing():
    """40 batches of one fault each give what one batch of 40 gives, however the plugin keeps
    its partial sums. Page i of 5 gets faults i, i + 5, ..., i + 35: 8 faults and stall
    8 i + 140."""
    df = faults(pid=1, addr=[BASE + (i % 5) * 4096 for i in range(40)], page_size=4096,
                stall_ns=list(range(40)))
    one = run(HotpagesPlugin, df, top=10)
    many = run(HotpagesPlugin, *(df.iloc[[i]] for i in range(40)), top=10)
    for table in ("pages", "regions"):
        pd.testing.assert_frame_equal(one[table], many[table])
    assert values(one["pages"]) == [[1, BASE + i * 4096, 8, 8 * i + 140] for i in (4, 3, 2, 1, 0)]
    assert values(one["regions"]) == [[1, BASE, 40, 780]]


# --- misuse -------------------------------------------------------------------------------


def test_misuse():
    """Failed ioctls from the ioctl records, each explained by (ioctl, errno, context), repeats
    apart from errors; unresolved faults from the fault rows."""
    minor, other = 0x10000, 0x90000
    io = ioctls(enter_ns=[1, 2, 3, 4, 5, 6, 7], pid=1, tid=[1, 2, 3, 4, 5, 6, 7],
                ioctl=["REGISTER", "CONTINUE", "CONTINUE", "COPY", "COPY", "CONTINUE", "CONTINUE"],
                start=[minor, minor, minor, minor, other, minor, minor],
                len=[0x10000, 4096, 4096, 4096, 4096, 4096, 4096],
                mode=[4, 0, 0, 0, 0, 0, 0], errno=[0, 0, 17, 17, 17, 22, 14])
    df = faults(fault_ns=[1, 2, 3], pid=1, tid=[1, 2, 3], addr=4096, resolver="CONTINUE",
                outcome=["resolved", "unresolved_exit", "unresolved_end"])
    sink = offline(MisusePlugin)
    sink.write_ioctls(io.iloc[:3])
    sink.write_ioctls(io.iloc[3:])
    sink.write(df)
    sink.close()
    t = sink.results["misuse"]
    errors = t["errors"]
    assert errors["tid"].tolist() == [3, 4, 5, 6, 7]
    assert errors["errno_name"].tolist() == ["EEXIST", "EEXIST", "EEXIST", "EINVAL", "EFAULT"]
    assert errors["category"].tolist() == ["already mapped"] * 3 + ["error"] * 2
    explained = errors["explanation"].tolist()
    assert "already mapped" in explained[0]
    assert "resolve with UFFDIO_CONTINUE" in explained[1]  # COPY into the MINOR range
    assert "UFFDIO_CONTINUE" not in explained[2]  # COPY elsewhere: a plain repeat
    assert "UFFDIO_REGISTER_MODE_MINOR" in explained[3]
    assert "not a minor fault" in explained[4]
    assert t["unresolved"]["tid"].tolist() == [2, 3]
    assert run(MisusePlugin, df.iloc[:1])["errors"].empty


ALREADY = "already mapped"
IN_MINOR = ("; in a MINOR-registered range the page cache holds the page: resolve with "
            "UFFDIO_CONTINUE")
# (ioctl, start, errno, pid): what failed, and the explanation expected for it
MISUSE_CASES = [
    ("REGISTER", 0x40000, 22, 1, "error", "invalid arguments for this ioctl, mode or memory"),
    ("CONTINUE", 0x10000, 17, 1, ALREADY, "CONTINUE on a page that is already mapped (a repeated "
                                          "or raced CONTINUE): it maps and wakes nothing"),
    ("COPY", 0x11000, 17, 1, ALREADY, "COPY onto a page that is already there" + IN_MINOR),
    ("COPY", 0x11000, 17, 2, ALREADY, "COPY onto a page that is already there"),  # not its range
    ("ZEROPAGE", 0x1F000, 17, 1, ALREADY, "ZEROPAGE onto a page that is already there" + IN_MINOR),
    ("ZEROPAGE", 0x20000, 17, 1, ALREADY, "ZEROPAGE onto a page that is already there"),  # past it
    ("COPY", 0x40000, 17, 1, ALREADY, "COPY onto a page that is already there"),  # REGISTER failed
    ("COPY", 0x80000, 17, 1, ALREADY, "COPY onto a page that is already there"),  # MISSING only
    ("COPY", None, 17, 1, ALREADY, "COPY onto a page that is already there"),
    ("CONTINUE", 0x10000, 22, 1, "error", "CONTINUE needs a range registered with "
                                          "UFFDIO_REGISTER_MODE_MINOR and page-aligned arguments"),
    ("CONTINUE", 0x10000, 14, 1, "error", "CONTINUE found no page in the page cache: not a minor "
                                          "fault (fill the page cache first, or resolve with UFFDIO_COPY)"),
    ("ZEROPAGE", 0x10000, 22, 1, "error", "ZEROPAGE is not supported on this memory (hugetlbfs) or "
                                          "the range is not page-aligned"),
    ("COPY", 0x10000, 11, 1, "error", "the mappings changed during the ioctl: retry it"),
    ("WAKE", 0x10000, 2, 1, "error", "the range is no longer registered (or the mapping went away)"),
    ("COPY", 0x10000, 3, 1, "error", "the faulting process is exiting"),
    ("CONTINUE", 0x10000, 12, 1, "error", "the kernel could not allocate memory for the page"),
    ("MOVE", 0x10000, 14, 1, "error", "a bad user address in the arguments, or no page to map"),
    ("UNREGISTER", 0x10000, 16, 1, "error", "UNREGISTER failed"),
    ("nr0x3f", 0x10000, 200, 1, "error", "nr0x3f failed"),
]


def test_misuse_explains_each_ioctl_and_errno():
    """After a MINOR registration of [0x10000, 0x20000) by pid 1 (and a failed one, and a
    MISSING-only one), every failed ioctl gets its category and explanation; a COPY or
    ZEROPAGE onto an existing page inside pid 1's MINOR range is told to use CONTINUE."""
    registers = ioctls(enter_ns=[1, 2], pid=1, tid=[1, 2], ioctl="REGISTER", start=[0x10000, 0x80000],
                       len=0x10000, mode=[4, 1], errno=0)
    n = len(MISUSE_CASES)
    failed = ioctls(enter_ns=list(range(10, 10 + n)), tid=list(range(10, 10 + n)),
                    ioctl=[c[0] for c in MISUSE_CASES], start=[c[1] for c in MISUSE_CASES],
                    errno=[c[2] for c in MISUSE_CASES], pid=[c[3] for c in MISUSE_CASES],
                    len=4096, mode=[4] + [0] * (n - 1))
    sink = offline(MisusePlugin)
    sink.write_ioctls(registers)
    sink.write_ioctls(failed.iloc[:5])
    sink.write_ioctls(failed.iloc[5:])
    sink.close()
    errors = sink.results["misuse"]["errors"]
    assert list(errors.columns) == ["enter_ns", "pid", "tid", "comm", "ioctl", "start", "len", "errno",
                                    "errno_name", "category", "explanation"]
    assert values(errors[["ioctl", "errno", "pid", "category", "explanation"]]) == [
        [c[0], c[2], c[3], c[4], c[5]] for c in MISUSE_CASES]
    assert errors["errno_name"].tolist() == [
        "EINVAL", *["EEXIST"] * 8, "EINVAL", "EFAULT", "EINVAL", "EAGAIN", "ENOENT", "ESRCH", "ENOMEM",
        "EFAULT", "EBUSY", "errno 200"]


def test_misuse_panel_counts_by_category_and_errno():
    plugin = live(MisusePlugin)
    plugin.ioctls(ioctls(pid=1, tid=[1, 2, 3, 4, 5], ioctl=["CONTINUE", "CONTINUE", "COPY", "COPY", "WAKE"],
                         start=0x10000, errno=[17, 17, 0, 14, 200], mode=0))
    plugin.batch(faults(pid=1, tid=[1, 2, 3], outcome=["resolved", "unresolved_exit", "unresolved_end"]))
    (panel,) = plugin.panels()
    assert panel.views[0].rows == (("already mapped: EEXIST", 2), ("error: 200", 1),
                                   ("error: EFAULT", 1), ("unresolved faults", 2))
    plugin.reset()
    assert plugin.panels()[0].views[0].rows == ()


# --- timeline -----------------------------------------------------------------------------


def test_timeline():
    s = 1_000_000_000
    df = faults(fault_ns=[10 * s, 10 * s + 1, 10 * s + 2, 12 * s + 5, None],
                resolver=["CONTINUE", "COPY", None, "CONTINUE", "CONTINUE"],
                stall_ns=[100, 200, 300, 400, 500])
    # every successful resolving ioctl counts (a COPY that woke nobody too), by its exit
    io = ioctls(ioctl=["CONTINUE", "COPY", "COPY", "CONTINUE", "ZEROPAGE", "REGISTER"],
                    errno=[0, 0, 0, 17, 0, 0],
                    exit_ns=[10 * s + 3, 10 * s + 4, 11 * s, 10 * s + 5, 12 * s + 6, 10 * s])
    sink = offline(TimelinePlugin, options={"timeline": {"interval_s": 0.5}})
    sink.write_ioctls(io)
    sink.write(df)
    sink.close()
    t = sink.results["timeline"]["intervals"]
    assert t["start_ns"].tolist() == [10 * s + i * s // 2 for i in range(5)]
    assert t["t_s"].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert t["faults"].tolist() == [3, 0, 0, 0, 1]
    assert t["faults_per_s"].tolist() == [6.0, 0, 0, 0, 2.0]
    assert t["continue_per_s"].tolist() == [2.0, 0, 0, 0, 0]
    assert t["copy_per_s"].tolist() == [2.0, 0, 2.0, 0, 0]
    assert t["zeropage_per_s"].tolist() == [0, 0, 0, 0, 2.0]
    assert t["p99_stall_ns"].tolist()[0] == round(np.percentile([100, 200, 300], 99))
    assert t["p99_stall_ns"].isna().tolist() == [False, True, True, True, False]
    rates = {r.name for r in timeline_panel_rates(io)}
    assert rates == {"faults/s", "CONTINUE/s", "COPY/s", "ZEROPAGE/s"}


def timeline_panel_rates(io: pd.DataFrame):
    plugin = TimelinePlugin()
    plugin.start(RunContext(targets=("t",), backend="file", mode="", live=True,
                            options={"interval_s": 1.0}))
    plugin.ioctls(io)
    (panel,) = plugin.panels()
    return panel.views[0].rates


def test_timeline_by_hand():
    """1 s intervals from 5 s: three faults at 5.0-5.4 s (p99 of 100, 200, 300 ns: 98 % of the way
    from the 2nd to the 3rd, 298) and one without stall at 7.5 s. Successful resolving ioctls
    by their exit: two CONTINUEs in 5 s, a WAKE in 6 s, a POISON in 7 s, a MOVE at 8.0 s
    exactly (the interval it starts). A failed COPY, a REGISTER and an ioctl without exit
    count for nothing."""
    df = faults(fault_ns=[5 * S, 5 * S + S // 5, 5 * S + 2 * S // 5, 7 * S + S // 2, None],
                stall_ns=[300, 100, 200, None, 50])
    io_rows = ioctls(ioctl=["CONTINUE", "CONTINUE", "COPY", "WAKE", "MOVE", "REGISTER", "POISON", "ZEROPAGE"],
                     errno=[0, 0, 17, 0, 0, 0, 0, 0],
                     exit_ns=[5 * S + S // 10, 6 * S - 1, 5 * S + S // 2, 6 * S + S // 2, 8 * S, 5 * S,
                              7 * S + S // 5, None])
    sink = offline(TimelinePlugin)
    sink.write_ioctls(io_rows)
    sink.write(df)
    sink.close()
    t = sink.results["timeline"]["intervals"]
    assert list(t.columns) == ["start_ns", "t_s", "faults", "faults_per_s", "continue_per_s", "copy_per_s",
                               "zeropage_per_s", "move_per_s", "poison_per_s", "wake_per_s", "p99_stall_ns"]
    assert values(t) == [
        [5 * S, 0.0, 3, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 298],
        [6 * S, 1.0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, None],
        [7 * S, 2.0, 1, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, None],
        [8 * S, 3.0, 0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, None],
    ]


def test_timeline_panel_shows_the_last_complete_second():
    """Per second of the data's clock: without ticks (a replay) the last second seen is the
    current one; with a tick at 6.5 s, second 5 is the last complete one."""
    df = faults(fault_ns=[5 * S, 5 * S + 1, 5 * S + 2, 7 * S + S // 2], stall_ns=[1, 2, 3, 4])
    io_rows = ioctls(ioctl=["CONTINUE", "CONTINUE", "MOVE"], errno=0,
                     exit_ns=[5 * S + 10, 5 * S + 20, 8 * S])
    plugin = live(TimelinePlugin)
    plugin.batch(df)
    plugin.ioctls(io_rows)
    (panel,) = plugin.panels()
    rates = {r.name: r for r in panel.views[0].rates}
    assert list(rates) == ["faults/s", "CONTINUE/s", "MOVE/s"]
    assert [(r.current, r.peak, len(r.history)) for r in rates.values()] == [
        (0.0, 3.0, 60), (0.0, 2.0, 60), (1.0, 1.0, 60)]
    assert rates["faults/s"].history[-4:] == (3.0, 0.0, 1.0, 0.0)  # seconds 5 to 8
    plugin.tick(6 * S + S // 2)
    rates = {r.name: r for r in plugin.panels()[0].views[0].rates}
    assert [r.current for r in rates.values()] == [3.0, 2.0, 0.0]


def test_timeline_refuses_an_interval_that_is_not_positive():
    err = io.StringIO()
    sink = offline(TimelinePlugin, options={"timeline": {"interval_s": 0.0}}, err=err)
    sink.write(faults(fault_ns=[S], stall_ns=[1]))
    sink.close()
    assert sink.failed == ["timeline"] and "timeline" not in sink.results
    assert err.getvalue() == ("uffdtrace: plugin timeline failed in start(): ValueError: option "
                              "interval_s must be positive; disabled\n")


# --- qemu ---------------------------------------------------------------------------------


def test_qemu_blocktime_in_both_definitions():
    """vCPU 0: two overlapping faults, vCPU 1: one; a thread that is no vCPU is ignored.
    True stall: [fault, fault + stall); QEMU's: [msg, cont_exit)."""
    df = faults(pid=7, tid=[10, 10, 11, 12], vcpu=[0, 0, 1, None],
                fault_ns=[100, 150, 120, 100], stall_ns=[100, 100, 60, 1000],
                msg_ns=[110, 160, 130, 110], cont_exit_ns=[170, 240, 150, 900])
    out = run(QemuPlugin, df)
    v = out["vcpus"].set_index("vcpu")
    assert v.loc[0, ["faults", "requests", "stall_ns", "qemu_ns"]].tolist() == [2, 2, 150, 130]
    assert v.loc[1, ["faults", "requests", "stall_ns", "qemu_ns"]].tolist() == [1, 1, 60, 20]
    (proc,) = out["processes"].itertuples()
    # both vCPUs blocked: stall [120, 180), QEMU [130, 150)
    assert (proc.vcpus, proc.faults, proc.all_blocked_ns, proc.all_blocked_qemu_ns) == (2, 3, 60, 20)


def test_qemu_panel_only_with_vcpus():
    plugin = QemuPlugin()
    plugin.start(RunContext(targets=("t",), backend="file", mode="", tables=False))
    plugin.batch(faults(pid=7, tid=12, fault_ns=[1], stall_ns=[5]))
    assert plugin.panels() == []
    plugin.batch(faults(pid=7, tid=[10, 10], vcpu=3, fault_ns=[1, 2], stall_ns=[4000, 6000],
                        msg_ns=[2, 3], cont_exit_ns=[1002, 2003]))
    (panel,) = plugin.panels()
    assert panel.views[0].rows == ((7, 3, 2, 10, 3),)


def test_qemu_by_hand():
    """pid 7, vCPU 0: faults [0, 50) and [30, 70), QEMU's view [5, 40) and [35, 60): 70 and 55
    once merged. vCPU 1: [20, 50) whose message QEMU never read (the background stream
    resolved it), and [100, 110) read at 102 but with no ioctl exit seen: stall 40, QEMU 0.
    Both vCPUs blocked during [20, 50). pid 8's vCPU 0 is another vCPU."""
    df = faults(pid=[7, 7, 7, 7, 8, 7], tid=[10, 10, 11, 11, 20, 12], vcpu=[0, 0, 1, 1, 0, None],
                fault_ns=[0, 30, 20, 100, 0, 0], stall_ns=[50, 40, 30, 10, 10, 10_000],
                msg_ns=[5, 35, None, 102, 1, 1], cont_exit_ns=[40, 60, None, None, 9, 5000])
    out = run(QemuPlugin, df.iloc[:3], df.iloc[3:])
    # pid, vcpu, tid, faults, requests, stall_ns, qemu_ns
    assert values(out["vcpus"]) == [[7, 0, 10, 2, 2, 70, 55], [7, 1, 11, 2, 1, 40, 0],
                                    [8, 0, 20, 1, 1, 10, 8]]
    # pid, vcpus, faults, all_blocked_ns, all_blocked_qemu_ns
    assert values(out["processes"]) == [[7, 2, 4, 30, 0], [8, 1, 1, 10, 8]]


# --- csv, and all of them -----------------------------------------------------------------


def test_csv_plugin_writes_what_record_writes(tmp_path):
    df = faults(fault_ns=[1, 2], pid=1, tid=[3, 4], comm="a,b", backing="shmem", errno=0)
    assert run(CsvPlugin, df, df, path=str(tmp_path / "p.csv")) == {}
    sink = CsvSink(tmp_path / "s.csv")
    sink.write(df)
    sink.write(df)
    sink.close()
    assert (tmp_path / "p.csv").read_text() == (tmp_path / "s.csv").read_text()
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == ",".join(FAULT_COLUMNS)


def test_csv_plugin_on_an_empty_run_writes_the_header(tmp_path):
    assert run(CsvPlugin, path=str(tmp_path / "p.csv")) == {}
    assert (tmp_path / "p.csv").read_text() == ",".join(FAULT_COLUMNS) + "\n"


def test_builtins_on_an_empty_run():
    infos = resolve(sorted(BUILTINS - {"csv"}))
    sink = offline(*infos)
    sink.close()
    assert sink.failed == []
    assert all(df.empty for tables in sink.results.values() for df in tables.values())
    assert "== latency: percentiles (0 rows) ==" in format_tables(sink.results)
