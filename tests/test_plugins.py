"""Plugin API, discovery, the plugin host (isolation, bounded queue) and each built-in plugin
on synthetic batches with known answers. Pure Python: no tracing."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from uffdtrace.aggregate import log2_us_buckets
from uffdtrace.errors import UserError
from uffdtrace.events import FAULT_COLUMNS, IOCTL_COLUMNS, coerce_faults
from uffdtrace.plugins import Plugin, PluginInfo, RunContext, installed, parse_options, resolve
from uffdtrace.sinks import plugins as host
from uffdtrace.sinks.csv import CsvSink
from uffdtrace.sinks.plugins import PluginSink, format_tables
from uffdtrace_plugins.blocktime import BlocktimePlugin
from uffdtrace_plugins.csv import CsvPlugin
from uffdtrace_plugins.hotpages import HotpagesPlugin
from uffdtrace_plugins.latency import LatencyPlugin
from uffdtrace_plugins.misuse import MisusePlugin
from uffdtrace_plugins.qemu import QemuPlugin
from uffdtrace_plugins.timeline import TimelinePlugin

BUILTINS = {"latency", "blocktime", "hotpages", "misuse", "timeline", "csv"}
UFFDTRACE = Path(sys.executable).with_name("uffdtrace")


def faults(**columns) -> pd.DataFrame:
    """A batch with FAULT_COLUMNS: the given columns, the rest <NA>."""
    n = max(len(v) for v in columns.values() if isinstance(v, list))
    return coerce_faults(pd.DataFrame({k: v if isinstance(v, list) else [v] * n
                                       for k, v in columns.items()}))


def offline(*infos: PluginInfo | type[Plugin], options=None, err=None) -> PluginSink:
    infos = [i if isinstance(i, PluginInfo) else PluginInfo(i, "test") for i in infos]
    ctx = RunContext(targets=("test",), backend="file", mode="", live=False)
    return PluginSink(infos, ctx, options, err=err)


def run(plugin: type[Plugin], *batches: pd.DataFrame, **options) -> dict[str, pd.DataFrame]:
    sink = offline(plugin, options={plugin.name: {**plugin.options, **options}})
    for b in batches:
        sink.write(b)
    sink.close()
    assert sink.failed == []
    return sink.results.get(plugin.name, {})


# --- API contract -------------------------------------------------------------------------


class Recorder(Plugin):
    name = "recorder"
    description = "remembers what the host gave it"
    options = {"factor": 2, "label": "x", "on": False}  # noqa: RUF012
    columns = ("tid", "stall_ns")

    def start(self, ctx):
        self.ctx = ctx
        self.seen: list[list[str]] = []
        self.rows = 0
        self.ticks = 0

    def batch(self, df):
        self.seen.append(list(df.columns))
        self.rows += len(df)

    def tick(self, now_ns):
        self.ticks += 1

    def finish(self):
        return {"rows": pd.DataFrame({"rows": [self.rows * self.ctx.options["factor"]]})}


def test_base_plugin_hooks_are_no_ops():
    p = Plugin()
    ctx = RunContext(targets=(), backend="file", mode="")
    assert p.start(ctx) is None and p.batch(faults(tid=[1])) is None and p.tick(0) is None
    assert p.finish() == {}
    assert ctx.kernel_release == os.uname().release and ctx.live


def test_host_passes_options_declared_columns_and_collects_tables():
    info = PluginInfo(Recorder, "test")
    sink = offline(info, options=parse_options(["recorder.factor=3", "recorder.on=yes"], [info]))
    sink.write(faults(tid=[1, 2, 3], stall_ns=[1, 2, 3]))
    sink.write(faults(tid=[4]).iloc[:0])  # empty batches are not handed over
    sink.write(faults(tid=[4], pid=[9]))
    plugin = sink._hosted[0].plugin
    assert plugin.seen == [["tid", "stall_ns"]] * 2
    assert dict(plugin.ctx.options) == {"factor": 3, "label": "x", "on": True}
    assert plugin.ctx.backend == "file" and not plugin.ctx.live
    sink.close()
    assert sink.results["recorder"]["rows"]["rows"].tolist() == [12]
    assert plugin.ticks == 0  # offline: no ticks


@pytest.mark.parametrize("opt, message", [
    ("recorder.nope=1", "plugin recorder has no option 'nope' (options: factor, label, on)"),
    ("recorder.factor=abc", "option recorder.factor must be int, not 'abc'"),
    ("recorder.on=maybe", "option recorder.on must be true or false, not 'maybe'"),
    ("other.factor=1", "--opt 'other.factor=1': plugin other is not selected"),
    ("factor=1", "--opt 'factor=1': expected PLUGIN.NAME=VALUE"),
])
def test_bad_options(opt, message):
    with pytest.raises(UserError) as e:
        parse_options([opt], [PluginInfo(Recorder, "test")])
    assert str(e.value) == message


# --- discovery ----------------------------------------------------------------------------


def test_builtins_are_entry_points():
    found = installed()
    assert found.keys() >= BUILTINS
    for name in BUILTINS:
        assert found[name].origin.startswith("entry point uffdtrace_plugins.")
        assert found[name].cls.description
    assert [i.name for i in resolve(["latency", "misuse"])] == ["latency", "misuse"]


def test_plugins_command_lists_builtins(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(PLUGIN_FILE)
    out = subprocess.run([UFFDTRACE, "plugins", str(path)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ORIGIN", "DESCRIPTION"]
    names = {line.split()[0]: line for line in lines[1:] if not line.startswith(" ")}
    assert BUILTINS | {"mine"} <= names.keys()
    assert "entry point uffdtrace_plugins.latency:LatencyPlugin" in names["latency"]
    assert f"file {path}" in names["mine"]
    assert "options: top=20" in out.stdout


PLUGIN_FILE = """
from uffdtrace.plugins import Plugin

class Mine(Plugin):
    name = "mine"
    description = "a plugin from a file"
"""


def test_plugin_from_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(PLUGIN_FILE)
    (info,) = resolve([str(path)])
    assert info.name == "mine" and info.origin == f"file {path}"
    (tmp_path / "other.py").write_text(
        "from uffdtrace.plugins import Plugin\n"
        "class A(Plugin):\n    name = 'a'\n"
        "class B(Plugin):\n    name = 'b'\n"
        "PLUGIN = B\n")
    assert resolve([str(tmp_path / "other.py")])[0].name == "b"


@pytest.mark.parametrize("source, message", [
    (None, "plugin file {path} not found"),
    ("x = 1\n", "plugin file {path} must define exactly one Plugin subclass or a PLUGIN "
                "attribute (found: none)"),
    ("from uffdtrace.plugins import Plugin\nclass A(Plugin):\n    name = 'a'\n"
     "class B(Plugin):\n    name = 'b'\n",
     "plugin file {path} must define exactly one Plugin subclass or a PLUGIN attribute "
     "(found: A, B)"),
    ("import no_such_module_here\n",
     "plugin file {path} fails on import: ModuleNotFoundError: No module named "
     "'no_such_module_here'"),
    ("PLUGIN = 3\n", "plugin file {path}: PLUGIN is not a uffdtrace.plugins.Plugin subclass"),
    ("from uffdtrace.plugins import Plugin\nclass A(Plugin):\n    name = 'a'\n"
     "    columns = ('tid', 'colour')\n",
     "plugin a (plugin file {path}) asks for unknown columns: colour"),
])
def test_bad_plugin_files(tmp_path, source, message):
    path = tmp_path / "bad.py"
    if source is not None:
        path.write_text(source)
    with pytest.raises(UserError) as e:
        resolve([str(path)])
    assert str(e.value) == message.format(path=path)


def test_names_never_import_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text(PLUGIN_FILE)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^unknown plugin 'mine' \(available: blocktime, "):
        resolve(["mine"])
    assert resolve(["./mine.py"])[0].name == "mine"
    with pytest.raises(UserError, match=r"^plugin latency given twice$"):
        resolve(["latency", "latency"])


# --- host: isolation, bounded queue, ticks ------------------------------------------------


class Raising(Plugin):
    name = "raising"
    hook = "batch"

    def start(self, ctx):
        if self.hook == "start":
            raise RuntimeError("no start")

    def batch(self, df):
        if self.hook == "batch":
            raise ValueError("bad batch")

    def finish(self):
        if self.hook == "finish":
            raise KeyError("k")
        return {"t": pd.DataFrame({"a": [1]})}


@pytest.mark.parametrize("live", [False, True])
@pytest.mark.parametrize("hook", ["start", "batch", "finish"])
def test_a_raising_plugin_is_disabled_and_the_others_finish(hook, live):
    raising = type("Raising", (Raising,), {"hook": hook})
    err = io.StringIO()
    ctx = RunContext(targets=(), backend="file", mode="", live=live)
    sink = PluginSink([PluginInfo(raising, "test"), PluginInfo(Recorder, "test")], ctx, err=err)
    for _ in range(3):
        sink.write(faults(tid=[1, 2]))
    sink.close()
    assert sink.failed == ["raising"]
    assert sink.results["recorder"]["rows"]["rows"].tolist() == [12]
    assert "raising" not in sink.results
    lines = err.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"uffdtrace: plugin raising failed in {hook}(): ")
    assert lines[0].endswith("; disabled")


class Slow(Plugin):
    name = "slow"
    release = threading.Event()

    def start(self, ctx):
        self.rows = 0

    def batch(self, df):
        self.release.wait(10)
        self.rows += len(df)

    def finish(self):
        return {"rows": pd.DataFrame({"rows": [self.rows]})}


def test_a_slow_plugin_never_blocks_the_writer_and_skipped_rows_are_counted(monkeypatch):
    monkeypatch.setattr(host, "BEHIND_WARN_S", 3600.0)  # one warning while running
    err = io.StringIO()
    ctx = RunContext(targets=(), backend="file", mode="", live=True)
    sink = PluginSink([PluginInfo(Slow, "test"), PluginInfo(Recorder, "test")], ctx,
                      queue_batches=2, err=err)
    batch = faults(tid=list(range(10)))
    recorder = next(h.plugin for h in sink._hosted if h.name == "recorder")
    waited = 0.0
    for i in range(20):
        sink.write(batch)
        t0 = time.monotonic()
        while recorder.rows < 10 * (i + 1) and time.monotonic() - t0 < 5:  # the fast one keeps up
            time.sleep(0.001)
        waited += time.monotonic() - t0
    # Only the fast plugin was waited for: the slow one, blocked until released, never held the writer.
    assert waited < 5.0
    Slow.release.set()
    sink.close()
    seen = sink.results["slow"]["rows"]["rows"].item()
    skipped = sink.skipped_rows["slow"]
    assert seen + skipped == 200 and 10 <= seen <= 40 and skipped >= 160
    assert sink.skipped_rows["recorder"] == 0
    assert sink.results["recorder"]["rows"]["rows"].item() == 400
    warning, behind = err.getvalue().splitlines()
    assert warning.startswith("uffdtrace: plugin slow is falling behind: ")
    assert behind == f"uffdtrace: plugin slow fell behind: {skipped} fault rows skipped"
    assert sink.failed == [] and sink.cut == []


def blocking_plugin() -> type[Plugin]:
    """A plugin whose batch() waits until released (a minute at most); `entered` is set in it."""

    class Blocking(Plugin):
        name = "blocking"
        entered, release = threading.Event(), threading.Event()

        def batch(self, df):
            self.entered.set()
            self.release.wait(60)

    return Blocking


def test_a_plugin_falling_behind_is_reported_while_running(monkeypatch):
    monkeypatch.setattr(host, "BEHIND_WARN_S", 3600.0)
    blocking, err = blocking_plugin(), io.StringIO()
    ctx = RunContext(targets=(), backend="file", mode="", live=True)
    sink = PluginSink([PluginInfo(blocking, "test")], ctx, queue_batches=4, err=err)
    batch = faults(tid=list(range(10)))
    sink.write(batch)
    assert blocking.entered.wait(10)  # its worker holds the first batch: the rest queue up
    for _ in range(2):
        sink.write(batch)
    assert err.getvalue() == ""  # half full
    sink.write(batch)
    assert err.getvalue() == ("uffdtrace: plugin blocking is falling behind: 3 of 4 batches queued, "
                              "0 skipped so far\n")
    sink.write(batch)
    sink.write(batch)  # skipped, but the last warning is too recent
    assert len(err.getvalue().splitlines()) == 1
    monkeypatch.setattr(host, "BEHIND_WARN_S", 0.0)
    sink.write(batch)
    assert err.getvalue().splitlines()[-1] == (
        "uffdtrace: plugin blocking is falling behind: 4 of 4 batches queued, 2 skipped so far")
    blocking.release.set()
    sink.close()
    assert err.getvalue().splitlines()[-1] == "uffdtrace: plugin blocking fell behind: 20 fault rows skipped"
    assert sink.cut == []


def test_at_close_a_plugin_still_busy_after_the_deadline_is_cut():
    """Close waits SHUTDOWN_S at most: the blocked plugin is cut, named, and gives no tables;
    the others finish as usual."""
    blocking, err = blocking_plugin(), io.StringIO()
    ctx = RunContext(targets=(), backend="file", mode="", live=True)
    sink = PluginSink([PluginInfo(blocking, "test"), PluginInfo(Recorder, "test")], ctx,
                      shutdown_s=0.5, err=err)
    try:
        for _ in range(5):
            sink.write(faults(tid=list(range(10))))
        sink.write_ioctls(pd.DataFrame({"ioctl": ["CONTINUE"] * 3}))
        t0 = time.monotonic()
        sink.close()
        took = time.monotonic() - t0
    finally:
        blocking.release.set()
    assert 0.5 <= took < 10  # not the minute its batch() would take
    assert sink.cut == ["blocking"] and sink.failed == []
    assert err.getvalue() == ("uffdtrace: plugin blocking skipped 6 batches (50 faults, 3 ioctls) at "
                              "shutdown: still busy 0.5 s after tracing stopped, so no tables\n")
    assert "blocking" not in sink.results
    assert sink.results["recorder"]["rows"]["rows"].item() == 100


def test_live_plugins_get_ticks():
    ctx = RunContext(targets=(), backend="file", mode="", live=True)
    sink = PluginSink([PluginInfo(Recorder, "test")], ctx, tick_s=0.01)
    time.sleep(0.1)
    sink.close()
    assert sink._hosted[0].plugin.ticks >= 3


# --- built-in plugins ---------------------------------------------------------------------


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


def ioctls(**columns) -> pd.DataFrame:
    """A batch with IOCTL_COLUMNS: the given columns, the rest <NA>."""
    n = max(len(v) for v in columns.values() if isinstance(v, list))
    return coerce_faults(pd.DataFrame({k: v if isinstance(v, list) else [v] * n
                                       for k, v in columns.items()}), IOCTL_COLUMNS)


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


def ioctl_rows(**columns) -> pd.DataFrame:
    """A batch with IOCTL_COLUMNS: the given columns, the rest <NA>."""
    n = max(len(v) for v in columns.values() if isinstance(v, list))
    return coerce_faults(pd.DataFrame({k: v if isinstance(v, list) else [v] * n
                                       for k, v in columns.items()}), IOCTL_COLUMNS)


def test_timeline():
    s = 1_000_000_000
    df = faults(fault_ns=[10 * s, 10 * s + 1, 10 * s + 2, 12 * s + 5, None],
                resolver=["CONTINUE", "COPY", None, "CONTINUE", "CONTINUE"],
                stall_ns=[100, 200, 300, 400, 500])
    # every successful resolving ioctl counts (a COPY that woke nobody too), by its exit
    io = ioctl_rows(ioctl=["CONTINUE", "COPY", "COPY", "CONTINUE", "ZEROPAGE", "REGISTER"],
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


def test_csv_plugin_writes_what_record_writes(tmp_path):
    df = faults(fault_ns=[1, 2], pid=1, tid=[3, 4], comm="a,b", backing="shmem", errno=0)
    assert run(CsvPlugin, df, df, path=str(tmp_path / "p.csv")) == {}
    sink = CsvSink(tmp_path / "s.csv")
    sink.write(df)
    sink.write(df)
    sink.close()
    assert (tmp_path / "p.csv").read_text() == (tmp_path / "s.csv").read_text()
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == ",".join(FAULT_COLUMNS)


def test_builtins_on_an_empty_run():
    infos = resolve(sorted(BUILTINS - {"csv"}))
    sink = offline(*infos)
    sink.close()
    assert sink.failed == []
    assert all(df.empty for tables in sink.results.values() for df in tables.values())
    assert "== latency: percentiles (0 rows) ==" in format_tables(sink.results)


def test_latency_throughput():
    rng = np.random.default_rng(1)
    n, batches = 100_000, 10
    batch = coerce_faults(pd.DataFrame({
        "backing": rng.choice(["shmem", "hugetlb"], n), "kind": "minor",
        **{m: rng.integers(1_000, 10_000_000, n) for m in
           ("stall_ns", "notify_ns", "handler_ns", "continue_ns", "wake_to_run_ns")}}))
    batch.loc[::7, "continue_ns"] = pd.NA
    sink = offline(LatencyPlugin)
    t0 = time.perf_counter()
    for _ in range(batches):
        sink.write(batch)
    sink.close()
    rate = n * batches / (time.perf_counter() - t0)
    print(f"latency plugin: {rate / 1e6:.1f} M rows/s")
    assert sink.results["latency"]["percentiles"]["count"].max() > n * batches // 3
    assert rate >= 1_000_000
