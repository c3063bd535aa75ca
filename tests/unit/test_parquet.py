"""`record -o FILE.parquet` (sinks/parquet.py) and `report` reading it back: the CSV's columns
and dtypes, nulls and dictionary columns, row groups, a write that fails half-way (the file
stays readable up to its last complete row group), and broken files ending in one line. Then
a 200k-row slice of the 10 M-row benchmark (bench/report_bench.py), checked for correctness
against pandas on the same rows. No root, no BPF."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.report_bench import fault_rows, write_recording
from uffdtrace.cli import main
from uffdtrace.commands.report import CHUNK_ROWS, open_recording, read_faults
from uffdtrace.errors import UserError
from uffdtrace.events import CATEGORIES, FAULT_COLUMNS, IOCTL_COLUMNS, coerce_faults
from uffdtrace.sinks.csv import CsvSink
from uffdtrace.sinks.parquet import ROW_GROUP_ROWS, IoctlParquetSink, ParquetSink, is_parquet

N = 150_000


def synthetic(n: int = N, seed: int = 3) -> pd.DataFrame:
    """Fault rows with nulls in integer, string and category columns, every category value,
    text that needs quoting in a CSV, and 64-bit extremes."""
    rng = np.random.default_rng(seed)
    fault = 10**12 + np.cumsum(rng.integers(1, 20_000, n))
    df = pd.DataFrame({
        "fault_ns": fault, "pid": rng.choice([100, 200], n), "tid": rng.integers(101, 109, n),
        "comm": rng.choice(["CPU 0/KVM", 'a,"b"', "ünï"], n),
        "addr": 0x7F0000000000 + rng.integers(0, 512, n) * 4096, "page_size": 4096,
        "backing": rng.choice(["hugetlb", "shmem", "anon"], n),
        "kind": rng.choice(["minor", "missing", "wp"], n), "stall_ns": rng.integers(1_000, 10**6, n),
        "resolver": "CONTINUE", "errno": 0, "outcome": rng.choice(
            ["resolved", "no_wait", "released", "interrupted", "unresolved_exit", "unresolved_end"], n)})
    df.loc[::5, "stall_ns"] = None
    df.loc[::7, ["kind", "comm"]] = None
    df.loc[::11, "backing"] = None
    df.loc[1, "addr"] = 2**63 - 1
    df.loc[2, "mfill_ns"] = -(2**63)
    return coerce_faults(df)


def write(path: Path, df: pd.DataFrame, batch: int = 5_000) -> ParquetSink:
    sink = ParquetSink(path)
    for first in range(0, len(df), batch):
        sink.write(df.iloc[first:first + batch])
    sink.close()
    return sink


def test_round_trip_keeps_columns_dtypes_nulls_and_categories(tmp_path):
    df = synthetic()
    path = tmp_path / "f.parquet"
    sink = write(path, df)
    assert sink.rows == N
    schema = pq.read_schema(path)
    assert schema.names == list(FAULT_COLUMNS)
    for name, (dtype, _) in FAULT_COLUMNS.items():
        want = (pa.dictionary(pa.int32(), pa.string()) if name in CATEGORIES
                else pa.int64() if dtype == "Int64" else pa.string())
        assert schema.field(name).type == want, name
        assert schema.field(name).nullable
    # batches of 5,000 rows are gathered into row groups of at least ROW_GROUP_ROWS
    meta = pq.ParquetFile(path).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sum(sizes) == N and all(s >= ROW_GROUP_ROWS for s in sizes[:-1]) and len(sizes) == 3
    back = pd.concat(read_faults(path, chunk_rows=40_000), ignore_index=True)
    pd.testing.assert_frame_equal(back, df)  # Int64 with <NA>, string with <NA>
    assert back["stall_ns"].isna().sum() == df["stall_ns"].isna().sum() > 0
    # and the same rows as the CSV of the same batches
    csv = tmp_path / "f.csv"
    csv_sink = CsvSink(csv)
    csv_sink.write(df)
    csv_sink.close()
    pd.testing.assert_frame_equal(pd.concat(read_faults(csv), ignore_index=True), back)


def test_chunks_are_streamed_and_only_the_columns_asked_for(tmp_path):
    path = tmp_path / "f.parquet"
    write(path, synthetic())
    recording = open_recording(path)
    chunks = list(recording.chunks(chunk_rows=40_000, select=["stall_ns", "pid", "backing"]))
    assert [len(c) for c in chunks] == [40_000, 40_000, 40_000, 30_000]
    assert list(chunks[0].columns) == ["pid", "backing", "stall_ns"]  # in the file's order
    assert chunks[1].index[0] == 40_000  # row numbers run on, as in a CSV's chunks
    assert chunks[0]["backing"].dtype == "string" and chunks[0]["pid"].dtype == "Int64"


def test_ioctl_rows_and_an_empty_recording(tmp_path):
    io = coerce_faults(pd.DataFrame({
        "enter_ns": [1, 2], "pid": 7, "tid": 8, "comm": "h", "ioctl": ["CONTINUE", "nr99"],
        "start": [4096, None], "len": 4096, "ret": [-17, 0], "errno": [17, 0]}), IOCTL_COLUMNS)
    sink = IoctlParquetSink(tmp_path / "io.parquet")
    sink.write(io.iloc[:0])  # fault rows are not this file's; an empty batch writes nothing
    sink.write_ioctls(io)
    sink.close()
    back = pd.concat(read_faults(tmp_path / "io.parquet", columns=IOCTL_COLUMNS))
    pd.testing.assert_frame_equal(back, io)
    empty = tmp_path / "empty.parquet"
    ParquetSink(empty).close()
    assert pq.read_schema(empty).names == list(FAULT_COLUMNS)
    assert list(read_faults(empty)) == []
    assert is_parquet("X.Parquet") and not is_parquet("x.csv") and not is_parquet("parquet")


FAIL_AFTER = 9 << 20  # bytes: a few row groups, then the write fails as on a full disk


def test_a_failed_write_leaves_the_row_groups_before_it_readable(tmp_path):
    """A file size limit (RLIMIT_FSIZE: EFBIG, as ENOSPC on a full disk) stops the writes
    half-way: one OSError naming the file, the file cut back to its last complete row group,
    and close() adds the footer of those row groups, so that `report` reads them."""
    path = tmp_path / "f.parquet"
    script = textwrap.dedent(f"""
        import json, resource, signal, sys
        from bench.report_bench import fault_rows
        from uffdtrace.sinks.parquet import ParquetSink
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({FAIL_AFTER}, {FAIL_AFTER}))
        sink = ParquetSink({str(path)!r})
        error = None
        try:
            for chunk in fault_rows(400_000):
                for first in range(0, len(chunk), 25_000):  # 3 writes to a row group
                    sink.write(chunk.iloc[first:first + 25_000])
        except OSError as e:
            error = [e.errno, e.strerror, e.filename]
        sink.close()
        json.dump({{"error": error, "rows": sink.rows}}, sys.stdout)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=Path(__file__).parents[2], timeout=120, check=True)
    assert out.stderr == ""
    result = json.loads(out.stdout)
    # the writes before the failed one were taken: the caller counted their rows
    assert result["error"] == [27, "File too large (and the 50,000 rows before, held for this "
                                   "row group, are not in the file)", str(path)]
    assert 0 < result["rows"] < 400_000 and result["rows"] % 75_000 == 0
    assert path.stat().st_size <= FAIL_AFTER
    back = pd.concat(read_faults(path), ignore_index=True)
    want = pd.concat(fault_rows(400_000), ignore_index=True).iloc[:result["rows"]]
    pd.testing.assert_frame_equal(back, want)


def test_the_second_writer_gives_the_footer_of_the_row_groups_in_the_file(tmp_path):
    """In process: the second writer's offsets are the file's after every row group."""
    path = tmp_path / "f.parquet"
    sink = ParquetSink(path)
    for chunk in fault_rows(300_000):
        sink.write(chunk)
        assert sink._in_file.size == sink._end == path.stat().st_size
    assert sink._second is not None
    sink.close()
    assert pq.ParquetFile(path).metadata.num_rows == 300_000


def uffdtrace(capsys, *args: str | Path) -> tuple[int, str, str]:
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def broken_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the one line `report` gives for it)."""
    good = tmp_path / "good.parquet"
    write(good, synthetic(20_000))
    data = good.read_bytes()
    files = {}

    def put(name: str, content: bytes, message: str, suffix: str = ".parquet") -> None:
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(content)
        files[name] = (path, message.format(path=path))

    put("truncated", data[:len(data) // 2],
        "{path}: the Parquet file has no footer, which is written last (was the recording "
        "interrupted?)")
    put("magic only", b"PAR1", "{path}: the Parquet file has no footer")
    corrupt = bytearray(data)
    corrupt[2_000:2_400] = b"\xff" * 400  # inside the first row group's pages
    put("corrupt pages", bytes(corrupt), "{path}: after row 0: ")
    footer = bytearray(data)
    footer[-300:-200] = b"\x00" * 100
    put("corrupt footer", bytes(footer), "{path}: not a readable Parquet file (")
    put("csv named parquet", b"fault_ns,pid\n", "{path} is not a Parquet file (it does not "
                                                "start with PAR1)")
    ioctls = tmp_path / "ioctls.parquet"
    IoctlParquetSink(ioctls).close()
    files["ioctls given as faults"] = (ioctls, f"{ioctls} is not a `uffdtrace record` Parquet "
                                               "file: missing columns fault_ns, ")
    weird = tmp_path / "weird.parquet"
    table = pq.read_table(good)
    backing = table.column("backing").to_pylist()
    backing[12_345] = "tmpfs"
    pq.write_table(table.set_column(7, "backing", pa.array(backing)), weird)
    files["category"] = (weird, f"{weird}: row 12346: column backing needs one of hugetlb, "
                                "shmem, anon (or empty), not 'tmpfs'")
    floats = tmp_path / "floats.parquet"
    pq.write_table(table.set_column(1, "pid", table.column("pid").cast(pa.float64())), floats)
    files["float pids"] = (floats, f"{floats} is not a `uffdtrace record` Parquet file: column "
                                   "pid holds double, not integers")
    files["missing"] = (tmp_path / "nope.parquet",
                        f"cannot read {tmp_path / 'nope.parquet'}: No such file or directory")
    return files


def test_broken_parquet_files_end_in_one_line(tmp_path, capsys):
    for name, (path, message) in broken_files(tmp_path).items():
        with pytest.raises(UserError) as e:
            for _ in read_faults(path):
                pass
        assert str(e.value).startswith(message), (name, str(e.value))
        assert "\n" not in str(e.value), name
        status, _, err = uffdtrace(capsys, "report", path)
        assert status == 2, name
        assert err.startswith(f"uffdtrace: {message}") and err.count("\n") == 1, (name, err)


def test_damaged_parquet_gives_rows_or_one_line(tmp_path):
    """Bytes changed or cut anywhere in a Parquet recording: its rows, or a UserError; never
    another exception (a traceback)."""
    good = tmp_path / "good.parquet"
    write(good, synthetic(3_000))
    data = good.read_bytes()
    rng = random.Random(16)
    damaged = tmp_path / "damaged.parquet"
    outcomes = set()
    for _ in range(300):
        content = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            content[rng.randrange(len(content))] = rng.randrange(256)
        if rng.random() < 0.3:
            content = content[:rng.randrange(len(content))]
        damaged.write_bytes(content)
        try:
            rows = sum(len(chunk) for chunk in read_faults(damaged, chunk_rows=1_000))
            outcomes.add("rows" if rows == 3_000 else "fewer rows")
        except UserError as e:
            assert "\n" not in str(e)
            outcomes.add("error")
    assert {"rows", "error"} <= outcomes


# --- a slice of the 10 M-row benchmark ---------------------------------------------------------

SLICE = 200_000


@pytest.fixture(scope="module")
def bench_slice(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    path = tmp_path_factory.mktemp("bench") / "slice.parquet"
    write_recording(path, SLICE)
    return path, pd.concat(fault_rows(SLICE), ignore_index=True)


def test_report_of_a_benchmark_slice_is_right(bench_slice, tmp_path, capsys):
    """The default plugins over the Parquet slice give what pandas gives on the same rows."""
    path, df = bench_slice
    assert pq.ParquetFile(path).metadata.num_rows == SLICE
    status, out, err = uffdtrace(capsys, "report", path, "--out", tmp_path, "--format", "json")
    assert status == 0, err
    doc = json.loads(out)
    assert doc["faults"] == SLICE and doc["failed"] == [] and doc["file"] == str(path)
    results = {p: {t: pd.read_csv(tmp_path / f"{p}_{t}.csv", keep_default_na=False,
                                  na_values=[""]) for t in tables}
               for p, tables in doc["results"].items()}

    pct = results["latency"]["percentiles"].set_index(["backing", "kind", "metric"])
    for (backing, kind), g in df.groupby([df["backing"].fillna("unknown"),
                                          df["kind"].fillna("unknown")]):
        stall = g["stall_ns"].dropna().to_numpy(np.int64)
        row = pct.loc[(backing, kind, "stall_ns")]
        assert row["count"] == stall.size
        assert row["p99_ns"] == int(np.percentile(stall, 99)) and row["max_ns"] == stall.max()

    threads = results["blocktime"]["threads"].set_index(["pid", "tid"])
    want = df.groupby(["pid", "tid"]).agg(faults=("tid", "size"), blocked_ns=("stall_ns", "sum"))
    assert threads[["faults", "blocked_ns"]].to_numpy().tolist() == want.to_numpy().tolist()
    procs = results["blocktime"]["processes"]
    assert procs["threads"].tolist() == [4, 2, 2] and procs["faults"].sum() == SLICE
    assert (procs["all_blocked_ns"] > 0).all()  # 2-4 threads each, all stalled now and then

    regions = results["hotpages"]["regions"]
    assert regions["faults"].sum() == SLICE and regions["stall_ns"].sum() == df["stall_ns"].sum()
    page = df["addr"] // df["page_size"] * df["page_size"]
    hottest = (df.assign(page=page).groupby(["pid", "page"])["stall_ns"].agg(["size", "sum"])
               .sort_values(["size", "sum"], ascending=False).head(20))
    pages = results["hotpages"]["pages"]
    assert pages[["faults", "stall_ns"]].to_numpy().tolist() == hottest.to_numpy().tolist()

    intervals = results["timeline"]["intervals"]
    assert intervals["faults"].sum() == SLICE
    unresolved = results["misuse"]["unresolved"]
    assert unresolved["outcome"].tolist() == ["unresolved_end"] * 5


def test_the_slice_is_read_in_chunks(bench_slice):
    path, _ = bench_slice
    sizes = [len(c) for c in open_recording(path).chunks(chunk_rows=CHUNK_ROWS // 4)]
    assert sizes == [CHUNK_ROWS // 4] * (SLICE // (CHUNK_ROWS // 4))
