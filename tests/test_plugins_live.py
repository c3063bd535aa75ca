"""Plugins on real recordings: live (record --plugin) equals offline (report), and the
built-ins agree with the exerciser's ground truth."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.root]

UFFDTRACE = [sys.executable, "-m", "uffdtrace"]
PLUGINS = ["latency", "blocktime", "hotpages", "misuse", "timeline"]


def traced_run(tmp: Path, exercise_args: list[str]) -> tuple[Path, pd.DataFrame, dict]:
    """`record --plugin ... -- exercise ...`: the live tables land in tmp/live, the ioctl rows
    (which plugins see too) in tmp/ioctls.csv."""
    gt_csv, gt_json = tmp / "gt.csv", tmp / "gt.json"
    workload = shlex.join([*UFFDTRACE, "exercise", *exercise_args, "--csv", str(gt_csv), "--json"])
    plugin_args = [a for p in PLUGINS for a in ("--plugin", p)]
    out = subprocess.run(
        [*UFFDTRACE, "record", "-o", str(tmp / "rec.csv"), "--ioctls", str(tmp / "ioctls.csv"), *plugin_args,
         "--plugin-out", str(tmp / "live"), "--", "sh", "-c", f"{workload} > {gt_json}"],
        capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return tmp / "rec.csv", pd.read_csv(gt_csv), json.loads(gt_json.read_text())


def report(tmp: Path, recording: Path, plugins: list[str]) -> Path:
    out_dir = tmp / "offline"
    plugin_args = [a for p in plugins for a in ("--plugin", p)]
    out = subprocess.run([*UFFDTRACE, "report", str(recording), "--ioctls", str(tmp / "ioctls.csv"),
                          *plugin_args, "--out", str(out_dir), "--format", "csv"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out_dir


@pytest.fixture(scope="module")
def run_with_threads(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    # A demand fetch of ~50 us per fault, as in post-copy: the kernel's stall leaves out only
    # the exception entry and exit (~1 us) of the exerciser's touch time.
    recording, gt, summary = traced_run(tmp, ["--pages", "3000", "--threads", "3",
                                              "--handler", "process", "--fetch-delay-us", "50"])
    return tmp, recording, gt, summary


def test_live_equals_offline(run_with_threads):
    tmp, recording, _, _ = run_with_threads
    offline = report(tmp, recording, PLUGINS)
    live_files = sorted(p.name for p in (tmp / "live").glob("*.csv"))
    assert live_files == sorted(p.name for p in offline.glob("*.csv"))
    assert {name.split("_")[0] for name in live_files} == set(PLUGINS)
    for name in live_files:
        pd.testing.assert_frame_equal(pd.read_csv(tmp / "live" / name), pd.read_csv(offline / name),
                                      check_exact=False, rtol=1e-9, obj=name)


def test_blocktime_matches_touch_durations(run_with_threads):
    """Per thread, the blocked time equals the sum of the exerciser's touch durations (5 %)."""
    tmp, _, gt, summary = run_with_threads
    threads = pd.read_csv(tmp / "live" / "blocktime_threads.csv").set_index("tid")
    truth = gt.groupby("tid")["stall_ns"].sum()
    assert set(threads.index) == set(truth.index)
    assert len(truth) == summary["threads"]
    for tid, blocked in truth.items():
        assert abs(threads.loc[tid, "blocked_ns"] - blocked) <= 0.05 * blocked, tid
        assert threads.loc[tid, "faults"] == (gt["tid"] == tid).sum()


def test_latency_counts_every_fault(run_with_threads):
    tmp, recording, gt, _ = run_with_threads
    rec = pd.read_csv(recording)
    assert len(rec) == len(gt)
    with_stall = rec["stall_ns"].notna().sum()  # all but faults resolved before they waited
    pct = pd.read_csv(tmp / "live" / "latency_percentiles.csv")
    assert pct[pct["metric"] == "stall_ns"]["count"].sum() == with_stall
    hist = pd.read_csv(tmp / "live" / "latency_histogram.csv")
    assert hist[hist["metric"] == "stall_ns"]["count"].sum() == with_stall


def test_hotpages_sees_each_page_once(run_with_threads):
    tmp, _, gt, _ = run_with_threads
    top = pd.read_csv(tmp / "live" / "hotpages_pages.csv")
    assert len(top) == 20 and (top["faults"] == 1).all()  # first touches: one fault a page
    regions = pd.read_csv(tmp / "live" / "hotpages_regions.csv")
    assert regions["faults"].sum() == len(gt)
    assert len(regions) == len(set(gt["addr"] // (2 << 20)))


@pytest.mark.parametrize(("misuse", "backing", "expected"),
                         [("copy-on-minor", "shmem", 17), ("zeropage-on-minor", "hugetlb", 22),
                          ("continue-on-missing", "shmem", 14)])
@pytest.mark.hugepages
def test_misuse_plugin_flags_the_seed_rules(tmp_path, misuse, backing, expected):
    _, _, summary = traced_run(tmp_path, ["--backing", backing, "--pages", "40",
                                                  "--misuse", misuse])
    errors = pd.read_csv(tmp_path / "live" / "misuse_errors.csv")
    assert len(errors) == summary["faults"]
    assert set(errors["errno"]) == {expected}
    assert errors["explanation"].notna().all()
    assert set(errors["pid"]) == {summary["pid"]}
