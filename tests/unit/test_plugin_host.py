"""Plugin API, discovery and the plugin host (isolation, bounded queue, ticks) with plugins
defined here: no tracing, no root. The built-in plugins are in test_plugins_unit.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.unit.batches import faults, offline
from uffdtrace.errors import UserError
from uffdtrace.plugins import Plugin, PluginInfo, RunContext, installed, parse_options, resolve
from uffdtrace.sinks import plugins as host
from uffdtrace.sinks.plugins import PluginSink

BUILTINS = {"latency", "blocktime", "hotpages", "misuse", "timeline", "csv"}
UFFDTRACE = Path(sys.executable).with_name("uffdtrace")


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
