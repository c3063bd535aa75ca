"""Shutdown has a deadline (issue #16). With a live plugin that takes 5 s per batch: the end of
the traced command or a first SIGINT/SIGTERM detaches BPF, then the plugins get 2 s in total;
what the slow one could not process is counted and named in one line, the summary follows and
the exit status is 1 (a plugin without its tables). A second signal exits at once (128 + its
number). The plugin falling behind is reported while the run goes on."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import read_stderr_until, reaped, still_loaded, tracing_started
from uffdtrace.targets import alive

pytestmark = [pytest.mark.root]

UFFDTRACE = [sys.executable, "-m", "uffdtrace"]
SLOW_PLUGIN = """
import time

from uffdtrace.plugins import Plugin


class Slow(Plugin):
    name = "slow"
    description = "5 s per batch"

    def batch(self, df):
        time.sleep(5)
"""
SKIPPED = re.compile(r"^uffdtrace: plugin slow skipped (\d+) batches \(([\d,]+) faults(, [\d,]+ ioctls)?\) "
                     r"at shutdown: still busy 2 s after tracing stopped, so no tables$", re.M)
BEHIND = "uffdtrace: plugin slow is falling behind: "


def record(tmp: Path, *args: str, command: list[str]) -> subprocess.Popen:
    """`record -o tmp/rec.csv --plugin slow.py ARGS -- COMMAND`."""
    (tmp / "slow.py").write_text(SLOW_PLUGIN)
    return subprocess.Popen([*UFFDTRACE, "record", "-o", str(tmp / "rec.csv"), "--plugin",
                             str(tmp / "slow.py"), *args, "--", *command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def skipped_at_shutdown(err: str) -> int:
    """The one line naming what the slow plugin could not process: its batches."""
    (line,) = SKIPPED.findall(err)
    assert int(line[0]) >= 1
    return int(line[0])


def test_the_command_ending_gives_plugins_two_seconds(tmp_path):
    """A ~1 s workload: uffdtrace is done about 2 s after it, not after 5 s per queued batch."""
    exercise = shlex.join([*UFFDTRACE, "exercise", "--pages", "1000", "--fetch-delay-us", "1000",
                           "--json"])
    t0 = time.monotonic()
    tracer = record(tmp_path, "--json", command=[
        "sh", "-c", f"{exercise} > {tmp_path / 'gt.json'}; date +%s.%N > {tmp_path / 'end'}"])
    with reaped(tracer):
        early, held = tracing_started(tracer)
        out, err = tracer.communicate(timeout=120)
    after_end_s = time.time() - float((tmp_path / "end").read_text())
    took_s = time.monotonic() - t0
    err = early + err
    assert tracer.returncode == 1, err
    skipped_at_shutdown(err)
    summary = json.loads(out)
    startup_s = summary["startup_s"]
    assert after_end_s < 8, err  # 2 s deadline, detaching, exiting
    assert took_s - startup_s < 15, err
    gt = json.loads((tmp_path / "gt.json").read_text())
    assert summary["command_exit"] == 0
    assert summary["faults"] == gt["faults"] == len(pd.read_csv(tmp_path / "rec.csv")) == 1000
    assert not still_loaded(held)


def start_long_run(tmp: Path) -> tuple[subprocess.Popen, str, set[int], int]:
    """A ~25 s workload traced with the slow plugin, once the plugin has fallen behind: the
    tracer, its stderr so far, its BPF programs and the exerciser's pid."""
    pid_file = tmp / "exerciser.pid"
    tracer = record(tmp, command=[*UFFDTRACE, "exercise", "--pages", "20000", "--fetch-delay-us",
                                  "1000", "--pid-file", str(pid_file)])
    early, held = tracing_started(tracer)
    early += read_stderr_until(tracer, BEHIND)
    return tracer, early, held, int(pid_file.read_text())


def gone(pid: int, wait_s: float = 30.0) -> bool:
    deadline = time.monotonic() + wait_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_one_signal_gives_plugins_two_seconds(tmp_path, sig):
    tracer, early, held, exerciser = start_long_run(tmp_path)
    with reaped(tracer):
        tracer.send_signal(sig)
        t0 = time.monotonic()
        _, err = tracer.communicate(timeout=60)
        took_s = time.monotonic() - t0
    err = early + err
    assert tracer.returncode == 1, err
    assert took_s < 10, err  # the command stopped, BPF detached, 2 s for the plugins
    skipped_at_shutdown(err)
    assert "tracer cost:" in err  # the summary
    assert gone(exerciser, wait_s=0)  # stopped with the tracer, and waited for
    assert not still_loaded(held)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_second_signal_exits_at_once(tmp_path, sig):
    tracer, early, held, exerciser = start_long_run(tmp_path)
    with reaped(tracer):
        tracer.send_signal(sig)
        assert gone(exerciser)  # the first signal was taken: the tracer stopped its command
        assert not still_loaded(held)  # BPF is detached first,
        assert tracer.poll() is None  # then the slow plugin has its 2 s
        tracer.send_signal(sig)
        t0 = time.monotonic()
        _, err = tracer.communicate(timeout=60)
        took_s = time.monotonic() - t0
    err = early + err
    assert tracer.returncode == 128 + sig, err
    assert took_s < 2, err  # at once: no waiting for the plugins
    assert err.endswith("uffdtrace: signal while ending: exiting at once\n"), err
    assert not SKIPPED.search(err) and "tracer cost:" not in err  # no waiting, no summary
