"""`uffdtrace top`: the Textual app against replayed recordings (a real one, and a synthetic one
for deterministic snapshots), a live traced exerciser, and the command in a real terminal."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from uffdtrace.aggregate import log2_us_buckets
from uffdtrace.commands.report import read_faults
from uffdtrace.commands.top import PANEL_PLUGINS  # what `top` shows
from uffdtrace.events import coerce_faults
from uffdtrace.plugins import Panel, Plugin, PluginInfo, RunContext, Table, resolve
from uffdtrace.probes.backends import resolve as resolve_backend
from uffdtrace.probes.tracepoint import TraceScope
from uffdtrace.session import Session
from uffdtrace.sinks.csv import CsvSink
from uffdtrace.sinks.plugins import PluginSink
from uffdtrace.targets import LaunchedCommand
from uffdtrace.tui import StatusLine, TopApp
from uffdtrace.tui.render import format_count, merged

UFFDTRACE = Path(sys.executable).with_name("uffdtrace")


@pytest.fixture(scope="module")
def backend() -> str:
    """What `top` runs on this kernel by default (asking needs root: only root tests use it)."""
    return resolve_backend("auto").name


class Exploding(Plugin):
    name = "exploding"
    description = "a panel plugin whose panels() raises"

    def panels(self):
        raise RuntimeError("boom")


class Garbled(Plugin):
    name = "garbled"
    description = "a panel whose table rows do not match its columns"

    def panels(self):
        return [Panel("bad", (Table("garbled table", ("pid", "x"), ((1,),)),))]


def replayed(path: Path, *extra: type[Plugin], err=None) -> PluginSink:
    """The panel plugins (and `extra`) fed with a recorded CSV, offline."""
    infos = [*resolve(PANEL_PLUGINS), *(PluginInfo(p, "test") for p in extra)]
    ctx = RunContext(targets=(f"file {path}",), backend="file", mode="full", live=False,
                     tables=False)
    host = PluginSink(infos, ctx, err=err, panels=True)
    for chunk in read_faults(path):
        host.write(chunk)
    return host


def text_of(app: TopApp, key: str) -> str:
    """What a panel box shows, as plain text."""
    box = app.boxes[key]
    with open(os.devnull, "w") as devnull:
        console = Console(width=box.content_size.width, record=True, file=devnull)
        console.print(box.render())
    return console.export_text()


def run_app(app: TopApp, scenario, size=(80, 24)) -> None:
    async def main():
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await scenario(pilot)

    asyncio.run(main())


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rec") / "faults.csv"
    subprocess.run([str(UFFDTRACE), "record", "-o", str(path), "--", str(UFFDTRACE), "exercise",
                    "--pages", "3000"], check=True, capture_output=True, timeout=60)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """A deterministic recording: two threads, lognormal latencies, a few failed ioctls."""
    rng = np.random.default_rng(7)
    n = 3000
    tid = np.where(rng.random(n) < 0.7, 101, 102)
    stall = (rng.lognormal(np.log(6000), 0.5, n)).astype(np.int64)
    df = pd.DataFrame({
        "fault_ns": 10**12 + np.arange(n) * 20_000, "pid": 100, "tid": tid,
        "comm": np.where(tid == 101, "touch0", "touch1"), "addr": 0x7F0000000000 + np.arange(n) * 4096,
        "page_size": 4096, "backing": "shmem", "kind": "minor", "stall_ns": stall,
        "notify_ns": stall // 4, "handler_ns": stall // 8,
        "continue_ns": rng.lognormal(np.log(900), 0.3, n).astype(np.int64),
        "wake_to_run_ns": stall // 5, "resolver": "CONTINUE",
        "errno": np.where(np.arange(n) % 1000 == 0, errno.EEXIST, 0), "outcome": "resolved",
    })
    path = tmp_path_factory.mktemp("syn") / "faults.csv"
    sink = CsvSink(str(path))
    sink.write(coerce_faults(df))
    sink.close()
    return path


def replay_app(path: Path, *extra: type[Plugin], tmp: Path = Path(), err=None) -> TopApp:
    host = replayed(path, *extra, err=err)
    return TopApp(host, lambda: "file backend · full mode · replay", snapshot_dir=tmp)


@pytest.mark.root
def test_replay_shows_what_plugins_computed(recording):
    app = replay_app(recording)
    faults = pd.concat(read_faults(recording))

    async def check(pilot):
        assert set(app.boxes) == {"latency.stall", "latency.continue", "latency.kinds",
                                  "timeline.rates", "blocktime.threads", "misuse.errors"}
        stall = faults["stall_ns"].dropna().to_numpy(np.int64)
        counts = np.bincount(log2_us_buckets(stall))
        view = app.boxes["latency.stall"].panel.views[0]
        assert list(view.counts) == counts[counts.nonzero()[0][0]:].tolist()
        shown = text_of(app, "latency.stall")
        assert f"n={stall.size}" in shown
        rows = shown.count("\n") - 1  # buckets merged to fit the box
        for count in merged(view, rows)[1]:
            assert f" {format_count(count)}\n" in shown
        threads = text_of(app, "blocktime.threads")
        for tid, n in faults.groupby("tid").size().items():
            assert str(tid) in threads and str(n) in threads
        assert "shmem" in text_of(app, "latency.kinds") and str(len(faults)) in text_of(
            app, "latency.kinds")
        assert "faults/s" in text_of(app, "timeline.rates")

    run_app(app, check)


def test_a_vcpu_panel_appears_with_vcpus(synthetic, tmp_path):
    """The same recording with its threads as QEMU's vCPUs 0 and 1: the qemu plugin's panel
    shows each vCPU's faults and blocked time (in µs, both definitions)."""
    faults = pd.concat(read_faults(synthetic))
    faults["vcpu"] = (faults["tid"] - 101).astype("Int64")
    faults["msg_ns"], faults["cont_exit_ns"] = faults["fault_ns"] + 100, faults["fault_ns"] + 2100
    path = tmp_path / "vcpus.csv"
    sink = CsvSink(str(path))
    sink.write(faults)
    sink.close()
    app = replay_app(path)

    expected = {(100, vcpu, len(rows), int(rows["stall_ns"].sum()) // 1000, 2 * len(rows))
                for vcpu, rows in faults.groupby("vcpu")}  # QEMU's definition: 2 µs per fault

    async def check(pilot):
        assert set(app.boxes["qemu.vcpus"].panel.views[0].rows) == expected
        text = text_of(app, "qemu.vcpus")
        assert all(f"{row[3]}" in text and f"{row[4]}" in text for row in expected), text

    run_app(app, check, size=(120, 40))


def test_keys(synthetic, tmp_path):
    app = replay_app(synthetic, tmp=tmp_path)

    async def keys(pilot):
        box = app.boxes["latency.stall"]
        assert box.border_title.startswith("stall latency")
        await pilot.press("m")
        assert box.border_title.startswith("notify latency")
        assert app.boxes["latency.continue"].border_title.startswith("handler latency")
        await pilot.press("l")
        assert app.log_scale and "log scale" in str(app.query_one("#status").render())
        await pilot.press("o")
        assert "pid▼" in text_of(app, "blocktime.threads")
        await pilot.press("f", *"999", "enter")
        await pilot.pause()
        assert app.pid_filter == 999 and "touch" not in text_of(app, "blocktime.threads")
        await pilot.press("f", *"100", "enter")
        await pilot.pause()
        threads = text_of(app, "blocktime.threads")
        assert app.pid_filter == 100 and "touch0" in threads and "touch1" in threads
        await pilot.press("s")
        saved = sorted(p.name for p in tmp_path.glob("uffdtrace-snapshot-*/*.csv"))
        assert "latency_stall_stall_latency.csv" in saved and len(saved) >= 8
        hist = pd.read_csv(next(tmp_path.glob("uffdtrace-snapshot-*/latency_stall_stall_latency.csv")))
        assert list(hist.columns) == ["lo_us", "hi_us", "count"] and hist["count"].sum() == 3000
        await pilot.press("p")
        assert app.paused and "PAUSED" in str(app.query_one("#status").render())
        await pilot.press("r")  # reset while paused: the screen keeps the old numbers
        await pilot.pause()
        assert "n=3000" in text_of(app, "latency.stall")
        await pilot.press("p")
        app.update()
        await pilot.pause()
        assert "no faults yet" in text_of(app, "latency.stall")
        await pilot.press("q")

    run_app(app, keys)
    assert app.return_code == 0


def test_crashing_panel_plugins_are_isolated(synthetic):
    err = io.StringIO()
    app = replay_app(synthetic, Exploding, Garbled, err=err)

    async def check(pilot):
        assert "exploding" in app.host.failed
        assert not any(k.startswith("exploding.") for k in app.boxes)
        assert "cannot draw this panel" in text_of(app, "garbled.bad")
        assert "n=3000" in text_of(app, "latency.stall")

    run_app(app, check)
    assert "plugin exploding failed in panels(): RuntimeError: boom" in err.getvalue()


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_snapshot(synthetic, snap_compare, size):
    assert snap_compare(replay_app(synthetic), terminal_size=size)


@pytest.mark.root
def test_live_exerciser(no_leaks, backend):
    """A traced exerciser: the live screen shows the numbers the session counted."""
    launched = LaunchedCommand([str(UFFDTRACE), "exercise", "--pages", "20000", "--cpus", "0"])
    infos = resolve(PANEL_PLUGINS)
    ctx = RunContext(targets=("exercise",), backend=backend, mode="full", tables=False)
    host = PluginSink(infos, ctx, tick_s=0.2, panels=True)
    session = Session("full", TraceScope(pids=(launched.pid,), follow_children=True), [host])
    try:
        session.start()
        launched.release()
        worker = threading.Thread(target=session.run,
                                  kwargs={"until": lambda: launched.poll() is not None})
        worker.start()
        app = TopApp(host, StatusLine(session.status, lambda: 0), interval_s=0.2)

        async def watch(pilot):
            deadline = time.monotonic() + 30
            while worker.is_alive() and time.monotonic() < deadline:
                await pilot.pause(0.2)
            await pilot.pause(0.6)  # a tick after the last batch
            assert f"{backend} backend" in str(app.query_one("#status").render())
            threads = app.boxes["blocktime.threads"].panel.views[0]
            assert sum(r[3] for r in threads.rows) == session.stats.faults
            assert session.stats.counts[("shmem", "minor")] == 20000
            stalls = session.stats.latency("stall")["count"]
            assert f"n={stalls}" in text_of(app, "latency.stall")
            assert "lost 0" in str(app.query_one("#status").render())

        run_app(app, watch, size=(120, 40))
    finally:
        session.stop()
        launched.terminate()
        launched.wait()
        session.close()


def run_in_terminal(argv: list[str], stop_after_s: float | None = None,
                    answer: tuple[tuple[str, ...], bytes] | None = None) -> tuple[int, str]:
    """Run `argv` on a pseudo-terminal (SIGTERM after `stop_after_s`; `answer` = (texts, keys):
    type the keys once the output shows all the texts): (exit code, output)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(TERM="xterm-256color", COLUMNS="100", LINES="30")
        os.execv(argv[0], argv)
    out, start, sent = b"", time.monotonic(), False
    while True:
        if stop_after_s is not None and not sent and time.monotonic() - start > stop_after_s:
            os.kill(pid, signal.SIGTERM)
            sent = True
        if answer is not None and all(text.encode() in out for text in answer[0]):
            os.write(fd, answer[1])
            answer = None
        if select.select([fd], [], [], 0.1)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        assert time.monotonic() - start < 60
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


@pytest.mark.parametrize("how", ["command exits", "SIGTERM"])
@pytest.mark.root
def test_top_command_restores_terminal(no_leaks, backend, how):
    delay = ["--delay-s", "30"] if how == "SIGTERM" else []
    code, out = run_in_terminal(
        [str(UFFDTRACE), "top", "--", str(UFFDTRACE), "exercise", "--pages", "5000", *delay],
        stop_after_s=4 if how == "SIGTERM" else None)
    assert code == 0, out[-2000:]
    assert "\x1b[?1049h" in out and out.rindex("\x1b[?1049l") > out.rindex("\x1b[?1049h")
    assert "tracer cost:" in out.split("\x1b[?1049l")[-1]  # printed after session.close()
    if how == "command exits":
        assert f"5000 faults ({backend} backend, full mode)" in out and "verified" in out


@pytest.mark.root
def test_top_hold_keeps_the_screen_until_q(no_leaks, backend):
    """--hold: the traced command ends, the screen stays with the final numbers until q."""
    code, out = run_in_terminal(
        [str(UFFDTRACE), "top", "--hold", "--", str(UFFDTRACE), "exercise", "--pages", "5000"],
        # the status says "ended" at once; the panels catch up at the plugins' next tick
        answer=(("ended, q quits", "n=5000"), b"q"))
    assert code == 0, out[-2000:]
    screen, after = out.rsplit("\x1b[?1049l", 1)
    assert "ended, q quits" in screen and "n=5000" in screen
    assert f"5000 faults ({backend} backend, full mode)" in after and "verified" in after


@pytest.mark.root
def test_top_stats_mode(no_leaks, backend):
    """--mode stats: the panels come from the aggregates BPF keeps (the ioctl table counts the
    exerciser's CONTINUEs), the panels that need rows say so, the summary counts every fault."""
    code, out = run_in_terminal(
        [str(UFFDTRACE), "top", "--mode", "stats", "--hold", "--", str(UFFDTRACE), "exercise",
         "--pages", "5000"],
        answer=(("ended, q quits", "continue", "5000", "--mode light or full"), b"q"))
    assert code == 0, out[-2000:]
    screen, after = out.rsplit("\x1b[?1049l", 1)
    assert "stall (in-kernel)" in screen and "faults/s by backing x kind" in screen
    assert f"5000 faults ({backend} backend, stats mode)" in after and "verified" in after
