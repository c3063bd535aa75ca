"""`uffdtrace report` on synthetic CSVs written by the record CSV writer: results, outputs, and
bad input ending in one clear line. The CLI runs for real, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from uffdtrace.commands.report import read_faults
from uffdtrace.errors import UserError
from uffdtrace.events import BACKINGS, FAULT_COLUMNS, IOCTL_COLUMNS, KINDS, coerce_faults
from uffdtrace.sinks.csv import CsvSink, IoctlCsvSink

UFFDTRACE = Path(sys.executable).with_name("uffdtrace")
N = 2000


def uffdtrace(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([UFFDTRACE, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


def synthetic() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    fault = 10**12 + np.sort(rng.integers(0, 3 * 10**9, N))
    stall = rng.integers(1_000, 3_000_000, N)
    df = pd.DataFrame({
        "fault_ns": fault, "pid": 100, "tid": rng.integers(101, 104, N), "comm": "vcpu, 0",
        "addr": 0x7F0000000000 + rng.integers(0, 512, N) * 4096, "page_size": 4096,
        "backing": "shmem", "kind": "minor", "stall_ns": stall, "continue_ns": stall // 10,
        "resolver": "CONTINUE", "errno": 0, "resume_ns": fault + stall, "outcome": "resolved",
    })
    df.loc[10, ["errno", "resolver"]] = [17, "COPY"]
    df.loc[20, ["outcome", "resume_ns", "stall_ns"]] = ["unresolved_exit", None, None]
    return coerce_faults(df)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rec") / "faults.csv"
    sink = CsvSink(path)
    df = synthetic()
    sink.write(df.iloc[:N // 2])
    sink.write(df.iloc[N // 2:])
    sink.close()
    return path


def test_read_faults_in_chunks_round_trips(recorded):
    chunks = list(read_faults(recorded, chunk_rows=300))
    assert len(chunks) == 7
    back = pd.concat(chunks, ignore_index=True)
    pd.testing.assert_frame_equal(back, synthetic())


@pytest.fixture(scope="module")
def recorded_ioctls(tmp_path_factory) -> Path:
    """The ioctl CSV of the same run: one CONTINUE that failed with EEXIST, one that worked."""
    path = tmp_path_factory.mktemp("rec") / "ioctls.csv"
    sink = IoctlCsvSink(path)
    sink.write_ioctls(coerce_faults(pd.DataFrame({
        "enter_ns": [10**12, 10**12 + 5], "pid": 100, "tid": 104, "comm": "handler",
        "ioctl": "CONTINUE", "start": 0x7F0000000000, "len": 4096, "mode": 0,
        "ret": [-17, 0], "errno": [17, 0], "mapped": [-17, 4096]}), IOCTL_COLUMNS))
    sink.close()
    return path


def test_report_tables_and_out_dir(recorded, recorded_ioctls, tmp_path):
    out = uffdtrace("report", recorded, "--ioctls", recorded_ioctls, "--out", tmp_path / "out",
                    cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{N} faults from {recorded}\n")
    for title in ("latency: percentiles", "blocktime: threads", "hotpages: pages",
                  "misuse: errors", "timeline: intervals"):
        assert f"== {title} (" in out.stdout
    assert "csv" not in {p.name.split("_")[0] for p in (tmp_path / "out").iterdir()}
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["blocktime_processes.csv", "blocktime_threads.csv", "hotpages_pages.csv",
                     "hotpages_regions.csv", "latency_histogram.csv", "latency_percentiles.csv",
                     "misuse_errors.csv", "misuse_unresolved.csv", "timeline_intervals.csv"]
    pct = pd.read_csv(tmp_path / "out" / "latency_percentiles.csv").set_index("metric")
    stall = synthetic()["stall_ns"].dropna().to_numpy(np.int64)
    assert pct.loc["stall_ns", "count"] == N - 1
    assert pct.loc["stall_ns", "p99_ns"] == int(np.percentile(stall, 99))
    errors = pd.read_csv(tmp_path / "out" / "misuse_errors.csv")
    assert errors["errno_name"].tolist() == ["EEXIST"]
    assert errors["category"].tolist() == ["already mapped"]


def test_report_json_and_csv_formats(recorded, tmp_path):
    out = uffdtrace("report", recorded, "--plugin", "timeline", "--opt", "timeline.interval_s=0.5",
                    "--format", "json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["faults"] == N and doc["failed"] == []
    intervals = doc["results"]["timeline"]["intervals"]
    assert sum(i["faults"] for i in intervals) == N
    assert intervals[1]["t_s"] == 0.5
    out = uffdtrace("report", recorded, "--plugin", "misuse", "--format", "csv", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "# misuse_errors"
    assert "# misuse_unresolved" in out.stdout


def test_report_with_a_file_plugin_that_fails(recorded, tmp_path):
    (tmp_path / "boom.py").write_text(
        "from uffdtrace.plugins import Plugin\n"
        "class Boom(Plugin):\n    name = 'boom'\n"
        "    def batch(self, df):\n        raise RuntimeError('kaboom')\n")
    out = uffdtrace("report", recorded, "--plugin", "./boom.py", "--plugin", "latency",
                    cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr == ("uffdtrace: plugin boom failed in batch(): RuntimeError: kaboom; "
                          "disabled\n")
    assert "== latency: percentiles" in out.stdout


HEADER = ",".join(FAULT_COLUMNS)


def _bad_files(recorded: Path) -> dict[str, tuple[str | bytes, str]]:
    """name -> (file content, expected message with {path})."""
    good = recorded.read_text()
    lines = good.splitlines(keepends=True)
    wrong = lines[5].split(",")
    wrong[1] = "12x"
    return {
        "empty": ("", "{path} is empty (no CSV header)"),
        "missing": (",".join(c for c in FAULT_COLUMNS if c != "errno") + "\n",
                    "{path} is not a `uffdtrace record` CSV: missing columns errno"),
        "extra": (HEADER + ",colour\n",
                  "{path} is not a `uffdtrace record` CSV: unexpected columns colour"),
        "order": (",".join(reversed(FAULT_COLUMNS)) + "\n",
                  "{path} is not a `uffdtrace record` CSV: columns out of order"),
        "truncated": (good[:-7], "{path}: the last line is truncated (was the recording "
                                 "interrupted?)"),
        "type": ("".join([*lines[:5], ",".join(wrong), *lines[6:]]),
                 "{path}: line 6: column pid needs an integer, not '12x'"),
        "fields": ("".join([*lines[:3], lines[3].rstrip("\n") + ",1\n", *lines[4:]]),
                   f"{{path}}: Expected {len(FAULT_COLUMNS)} fields in line 4, saw "
                   f"{len(FAULT_COLUMNS) + 1}"),
        "backing": ("".join([*lines[:6], lines[6].replace('"shmem"', '"weird"'), *lines[7:]]),
                    "{path}: line 7: column backing needs one of hugetlb, shmem, anon (or empty), "
                    "not 'weird'"),
        # the first bad row is named, even when the next row's earlier column is bad too
        "kind": ("".join([*lines[:3], lines[3].replace('"minor"', '"bogus"'),
                          lines[4].replace('"shmem"', '"weird"'), *lines[5:]]),
                 "{path}: line 4: column kind needs one of minor, missing, wp (or empty), "
                 "not 'bogus'"),
        "binary": (b"\x89PNG\r\n\x1a\n\xff\xd8\xff\xe0" * 100 + b"\n",
                   "{path} is not a `uffdtrace record` CSV: its first line is not text"),
        "binary rows": ((HEADER + "\n").encode() + b"\xff\xfe\xfa,\x80\x81\n" * 50,
                        "{path}: not UTF-8 text after the header (a binary file?)"),
        "junk header": (",".join(f"column{i}" * 9 for i in range(40)) + "\n",
                        "{path} is not a `uffdtrace record` CSV: missing columns fault_ns, pid, tid, "
                        "comm, vcpu, addr (and 23 more); unexpected columns "
                        + ", ".join(f"column{i}" * 3 + "column..." for i in range(6)) + " (and 34 more)"),
    }


@pytest.mark.parametrize("case", ["empty", "missing", "extra", "order", "truncated", "type",
                                  "fields", "backing", "kind", "binary", "binary rows",
                                  "junk header"])
def test_bad_csv_in_process(recorded, tmp_path, case):
    content, message = _bad_files(recorded)[case]
    path = tmp_path / f"{case}.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(UserError) as e:
        for _ in read_faults(path, chunk_rows=2):
            pass
    assert str(e.value) == message.format(path=path)


def test_every_backing_and_kind_is_accepted_and_empty_too(tmp_path):
    path = tmp_path / "faults.csv"
    df = synthetic().iloc[:12]
    df["backing"] = pd.array([*BACKINGS, None] * 3, dtype="string")
    df["kind"] = pd.array([*KINDS, None] * 3, dtype="string")
    sink = CsvSink(path)
    sink.write(df)
    sink.close()
    pd.testing.assert_frame_equal(pd.concat(read_faults(path, chunk_rows=5)), df)


def test_bad_input_ends_in_one_line(recorded, tmp_path):
    """Each bad input exits non-zero with one `uffdtrace:` line on stderr and no traceback."""
    bad = tmp_path / "type.csv"
    bad.write_text(_bad_files(recorded)["type"][0])
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(_bad_files(recorded)["binary rows"][0])
    weird = tmp_path / "weird.csv"
    weird.write_text(_bad_files(recorded)["backing"][0])
    cases = [
        ([empty], f"{empty} is empty (no CSV header)"),
        ([binary], f"{binary}: not UTF-8 text after the header (a binary file?)"),
        ([bad], f"{bad}: line 6: column pid needs an integer, not '12x'"),
        ([weird], f"{weird}: line 7: column backing needs one of hugetlb, shmem, anon (or empty), "
                  "not 'weird'"),
        (["nope.csv"], "cannot read nope.csv: No such file or directory"),
        ([recorded, "--plugin", "nosuch"], "unknown plugin 'nosuch' (available: blocktime, "),
        ([recorded, "--plugin", "./gone.py"], "plugin file ./gone.py not found"),
        ([recorded, "--opt", "latency.top=3"],
         "plugin latency has no option 'top' (options: none)"),
        ([recorded, "--plots"], "--plots writes PNG files: give them a directory with --out DIR"),
    ]
    procs = [subprocess.Popen([UFFDTRACE, "report", *map(str, args)], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for args, _ in cases]
    for proc, (_, message) in zip(procs, cases, strict=True):
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(f"uffdtrace: {message}"), err


def test_plots_need_matplotlib(recorded, tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        out = uffdtrace("report", recorded, "--plots", "--out", tmp_path, cwd=tmp_path)
        assert out.returncode == 2
        assert out.stderr == "uffdtrace: --plots needs matplotlib: install matplotlib\n"
    else:
        out = uffdtrace("report", recorded, "--plots", "--out", tmp_path, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        for name in ("latency_stall_histogram.png", "timeline_stall.png",
                     "blocktime_threads.png"):
            assert (tmp_path / name).stat().st_size > 0
