"""`uffdtrace report` over several recordings at once (many hosts' files): a `source` column
on every row and first in every table, per-process and per-thread results that keep two
hosts' identical pids and tids apart, CSV and Parquet mixed, --ioctls matched by order. No
root, no BPF: the command runs in process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from uffdtrace.cli import main
from uffdtrace.events import IOCTL_COLUMNS, SOURCE, coerce_faults
from uffdtrace.sinks.csv import CsvSink, IoctlCsvSink
from uffdtrace.sinks.parquet import IoctlParquetSink, ParquetSink

BASE = 0x7F0000000000
PLUGINS = ("latency", "blocktime", "hotpages", "misuse", "timeline", "qemu")


def host(seed: int, t0: int, n: int = 3_000) -> pd.DataFrame:
    """One host's faults: the same pids and tids on every host (pid 100 a QEMU with vCPUs 0
    and 1 as tids 101 and 102, pid 200 with tid 201), its own clock, pages and stalls."""
    rng = np.random.default_rng(seed)
    tid = rng.choice([101, 102, 201], n)
    fault = t0 + np.cumsum(rng.integers(1_000, 2_000_000, n))
    stall = rng.integers(1_000, 3_000_000, n)
    df = pd.DataFrame({
        "fault_ns": fault, "pid": np.where(tid < 200, 100, 200), "tid": tid,
        "comm": np.where(tid < 200, "CPU 0/KVM", "worker"),
        "vcpu": pd.array(np.where(tid < 200, tid - 101, -1), dtype="Int64"),
        "addr": BASE + rng.integers(0, 64, n) * 4096 + 5, "page_size": 4096,
        "backing": "shmem", "kind": rng.choice(["minor", "missing"], n), "stall_ns": stall,
        "continue_ns": stall // 10, "resolver": "CONTINUE", "errno": 0,
        "msg_ns": fault + 500, "cont_exit_ns": fault + stall // 2, "resume_ns": fault + stall,
        "outcome": "resolved"})
    df.loc[df["vcpu"] < 0, "vcpu"] = pd.NA
    df.loc[df.index[-1], ["outcome", "stall_ns", "resume_ns"]] = ["unresolved_end", None, None]
    return coerce_faults(df)


def recorded(path: Path, df: pd.DataFrame) -> Path:
    """`df` written by the record writer of the path's suffix, in batches."""
    sink = ParquetSink(path) if path.suffix == ".parquet" else CsvSink(path)
    for first in range(0, len(df), 1_000):
        sink.write(df.iloc[first:first + 1_000])
    sink.close()
    return path


def report(capsys, *args: str | Path) -> dict:
    """`uffdtrace report ARGS --format json`, in process: its document, tables as frames."""
    status = main(["report", *map(str, args), "--format", "json",
                   *(a for p in PLUGINS for a in ("--plugin", p)), "--opt", "hotpages.top=1000"])
    out, err = capsys.readouterr()
    assert status == 0 and err == "", err
    doc = json.loads(out)
    doc["results"] = {p: {t: pd.DataFrame(rows) for t, rows in tables.items()}
                      for p, tables in doc["results"].items()}
    return doc


@pytest.fixture
def hosts(tmp_path) -> dict[str, Path]:
    """Two hosts with the same pids and tids, 1000 s apart on their clocks: one Parquet, one
    CSV."""
    return {"hostA": recorded(tmp_path / "hostA.parquet", host(1, 10**12)),
            "hostB": recorded(tmp_path / "hostB.csv", host(2, 10**12 + 1000 * 10**9))}


def test_every_table_is_each_recordings_own(hosts, capsys):
    """Over hostA (Parquet) and hostB (CSV), each plugin's table for source S is exactly the
    table of a report over S alone: nothing of one host leaks into the other's pid 100."""
    both = report(capsys, *hosts.values())
    assert both["faults"] == 6_000
    assert both["files"] == [{"path": str(p), "source": s, "faults": 3_000}
                             for s, p in hosts.items()]
    for source, path in hosts.items():
        alone = report(capsys, path)["results"]
        for plugin, tables in alone.items():
            for name, want in tables.items():
                got = both["results"][plugin][name]
                if want.empty:  # JSON has no columns for no rows
                    assert got.empty, (plugin, name)
                    continue
                assert list(got.columns) == [SOURCE, *want.columns], (plugin, name)
                mine = got[got[SOURCE] == source].drop(columns=SOURCE).reset_index(drop=True)
                pd.testing.assert_frame_equal(mine, want, check_dtype=False, obj=f"{plugin} {name}")
    threads = both["results"]["blocktime"]["threads"]
    assert threads[["source", "pid", "tid"]].values.tolist() == [
        [s, pid, tid] for s in hosts for pid, tid in ((100, 101), (100, 102), (200, 201))]
    vcpus = both["results"]["qemu"]["vcpus"]
    assert vcpus[["source", "pid", "vcpu"]].values.tolist() == [
        [s, 100, v] for s in hosts for v in (0, 1)]


def test_empty_tables_have_the_source_column_too(hosts, tmp_path, capsys):
    assert main(["report", *map(str, hosts.values()), "--out", str(tmp_path), "--plugin",
                 "misuse", "--plugin", "qemu"]) == 0
    capsys.readouterr()
    errors = pd.read_csv(tmp_path / "misuse_errors.csv")  # no --ioctls: no rows
    assert errors.empty and errors.columns[0] == SOURCE
    assert pd.read_csv(tmp_path / "qemu_vcpus.csv").columns[0] == SOURCE


def test_timeline_intervals_are_per_recording(hosts, capsys):
    """The hosts' clocks are 1000 s apart: each gets its own intervals from its own t_s 0,
    not 1000 empty seconds between them."""
    intervals = report(capsys, *hosts.values())["results"]["timeline"]["intervals"]
    for source, g in intervals.groupby(SOURCE):
        assert g["t_s"].iloc[0] == 0 and g["faults"].sum() == 3_000
        assert len(g) < 20, source  # ~3000 faults at ~1 ms apart: a few seconds


def test_pid_collisions_across_recordings_stay_apart(tmp_path, capsys):
    """Same pid and tid on two hosts, blocked at overlapping instants of their own clocks:
    per host, one thread each; all_blocked_ns counts each host's own threads only."""
    # host X: pid 7 threads 1 and 2 stalled together during [50, 100); host Y: pid 7 thread 1
    # only, [0, 1000). Merged, pid 7 would have 2 threads blocked together over [0, 100).
    x = coerce_faults(pd.DataFrame({"fault_ns": [0, 50], "pid": 7, "tid": [1, 2],
                                    "comm": ["a", "b"], "stall_ns": [100, 60],
                                    "addr": BASE, "page_size": 4096}))
    y = coerce_faults(pd.DataFrame({"fault_ns": [0], "pid": 7, "tid": [1], "comm": ["c"],
                                    "stall_ns": [1000], "addr": BASE, "page_size": 4096}))
    paths = [recorded(tmp_path / "x.parquet", x), recorded(tmp_path / "y.parquet", y)]
    results = report(capsys, *paths)["results"]
    threads = results["blocktime"]["threads"]
    assert threads.values.tolist() == [["x", 7, 1, "a", 1, 100], ["x", 7, 2, "b", 1, 60],
                                       ["y", 7, 1, "c", 1, 1000]]
    procs = results["blocktime"]["processes"]
    assert procs.values.tolist() == [["x", 7, 2, 2, 160, 50], ["y", 7, 1, 1, 1000, 1000]]
    pages = results["hotpages"]["pages"]
    assert pages.values.tolist() == [["x", 7, BASE, 2, 160], ["y", 7, BASE, 1, 1000]]


def ioctl_file(path: Path, rows: dict) -> Path:
    io = coerce_faults(pd.DataFrame(rows), IOCTL_COLUMNS)
    sink = IoctlParquetSink(path) if path.suffix == ".parquet" else IoctlCsvSink(path)
    sink.write_ioctls(io)
    sink.close()
    return path


def test_ioctls_match_their_recording_by_order(tmp_path, capsys):
    """Host A's pid 1 registered MINOR on [0x10000, 0x20000): its COPY there that failed with
    EEXIST is told to use CONTINUE. Host B's pid 1 registered nothing: its COPY at the same
    address is a plain repeat."""
    faults = coerce_faults(pd.DataFrame({"fault_ns": [1], "pid": 1, "tid": 2, "stall_ns": [5]}))
    a = recorded(tmp_path / "a.csv", faults)
    b = recorded(tmp_path / "b.parquet", faults)
    io_a = ioctl_file(tmp_path / "io-a.parquet", {
        "enter_ns": [1, 2], "pid": 1, "tid": 3, "ioctl": ["REGISTER", "COPY"],
        "start": 0x10000, "len": [0x10000, 4096], "mode": [4, 0], "errno": [0, 17]})
    io_b = ioctl_file(tmp_path / "io-b.csv", {
        "enter_ns": [1], "pid": 1, "tid": 3, "ioctl": ["COPY"], "start": 0x10000, "len": 4096,
        "mode": 0, "errno": [17]})
    errors = report(capsys, a, b, "--ioctls", io_a, io_b)["results"]["misuse"]["errors"]
    assert errors[["source", "ioctl", "errno_name"]].values.tolist() == [
        ["a", "COPY", "EEXIST"], ["b", "COPY", "EEXIST"]]
    assert "resolve with UFFDIO_CONTINUE" in errors["explanation"][0]
    assert "UFFDIO_CONTINUE" not in errors["explanation"][1]
    # --ioctls repeated works the same; one per recording, or none
    again = report(capsys, a, b, "--ioctls", io_a, "--ioctls", io_b)["results"]["misuse"]["errors"]
    pd.testing.assert_frame_equal(again, errors)
    assert main(["report", str(a), str(b), "--ioctls", str(io_a)]) == 2
    assert capsys.readouterr().err == ("uffdtrace: --ioctls: 1 files for 2 recordings: give "
                                       "one per recording, in the same order\n")
    # --ioctls takes every name after it: the recordings come first
    assert main(["report", "--ioctls", str(io_a), str(a)]) == 2
    assert capsys.readouterr().err == (
        "uffdtrace: name the recordings before --ioctls: uffdtrace report FILE [FILE ...] "
        "--ioctls IOCTLS [IOCTLS ...]\n")


def test_the_same_name_in_two_directories_is_told_by_its_path(tmp_path, capsys):
    (tmp_path / "h1").mkdir()
    (tmp_path / "h2").mkdir()
    df = host(3, 10**12, n=100)
    one = recorded(tmp_path / "h1" / "faults.parquet", df)
    two = recorded(tmp_path / "h2" / "faults.csv", df)
    other = recorded(tmp_path / "other.csv", df)
    doc = report(capsys, one, two, other)
    assert [f["source"] for f in doc["files"]] == [str(one), str(two), "other"]
    assert set(doc["results"]["latency"]["percentiles"][SOURCE]) == {str(one), str(two), "other"}
    status = main(["report", str(one), str(tmp_path / "h1" / ".." / "h1" / "faults.parquet")])
    assert status == 2
    assert capsys.readouterr().err.endswith("faults.parquet is given twice\n")


def test_text_output_names_each_recording(hosts, capsys):
    assert main(["report", *map(str, hosts.values()), "--plugin", "blocktime"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["6000 faults from 2 recordings (column source):",
                       f"  hostA: 3000 faults ({hosts['hostA']})",
                       f"  hostB: 3000 faults ({hosts['hostB']})"]


def test_plugins_get_the_source_with_the_columns_they_name(hosts, tmp_path, capsys):
    """A plugin that names its columns gets `source` too over several recordings (and only
    then), so that it can group by it."""
    (tmp_path / "seen.py").write_text(
        "import pandas as pd\n"
        "from uffdtrace.plugins import Plugin\n"
        "class Seen(Plugin):\n"
        "    name = 'seen'\n"
        "    columns = ('pid',)\n"
        "    def start(self, ctx):\n        self.columns_seen = set()\n"
        "    def batch(self, df):\n        self.columns_seen.add(tuple(df.columns))\n"
        "    def finish(self):\n"
        "        return {'columns': pd.DataFrame({'seen': sorted(map(str, self.columns_seen))})}\n")
    for files, seen in ((list(hosts.values()), "('pid', 'source')"),
                        ([hosts["hostA"]], "('pid',)")):
        assert main(["report", *map(str, files), "--plugin", str(tmp_path / "seen.py"),
                     "--format", "json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["results"]["seen"]["columns"] == [{"seen": seen}]


def test_plots_over_several_recordings(hosts, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["report", *map(str, hosts.values()), "--out", str(tmp_path / "out"),
                 "--plots"]) == 0
    for name in ("latency_stall_histogram.png", "timeline_stall.png", "blocktime_threads.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
