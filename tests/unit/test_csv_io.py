"""The CSVs of `record` (uffdtrace/sinks/csv.py: CsvSink, IoctlCsvSink) read back by `report`'s
reader (uffdtrace/commands/report.py: read_faults), on synthetic rows: values, missing cells
and dtypes survive the round trip, a file of the wrong kind is refused in one line, and a
failed write leaves whole rows. The bad-CSV catalogue of the reader is in tests/test_report.py;
fuzzing in test_fuzz.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pandas as pd
import pytest

from uffdtrace.commands.report import read_faults
from uffdtrace.errors import UserError
from uffdtrace.events import FAULT_COLUMNS, IOCTL_COLUMNS, coerce_faults
from uffdtrace.sinks.csv import CsvSink, IoctlCsvSink

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
FAULT_HEADER = ",".join(FAULT_COLUMNS) + "\n"
IOCTL_HEADER = ",".join(IOCTL_COLUMNS) + "\n"


def int64(*values) -> pd.arrays.IntegerArray:
    return pd.array(list(values), dtype="Int64")


def text(*values) -> pd.arrays.StringArray:
    return pd.array(list(values), dtype="string")


def fault_rows() -> pd.DataFrame:
    """Six faults: the extremes of Int64, missing values in integer and text columns, and
    thread names a CSV has to quote or a reader could mistake for missing."""
    return coerce_faults(pd.DataFrame({
        "fault_ns": int64(I64_MAX, 1_000_000, 1_000_500, None, 2_000_000, 3_000_000),
        "pid": 4242,
        "tid": int64(4243, 4244, 4245, 4246, 4247, 4248),
        "comm": text("CPU 0/KVM", "vcpu, 1", 'say "hi"', "two\nlines", "NA", None),
        "vcpu": int64(0, None, None, None, None, None),
        "addr": int64(0x7FFF_FFFF_F000, 0x7F00_0000_1000, None, 0, 0x7F00_0000_3000, 1),
        "page_size": int64(4096, 2 << 20, None, 4096, 4096, 4096),
        "backing": text("shmem", "hugetlb", None, "anon", "shmem", "shmem"),
        "kind": text("minor", "missing", None, "wp", "minor", None),
        "stall_ns": int64(I64_MAX, 0, None, 7, 8, 9),
        "resolver": text("CONTINUE", "COPY", None, "other", "nr0x3f", None),
        "errno": int64(0, 17, None, 0, 0, None),
        "mapped": int64(4096, -17, None, I64_MIN, 0, None),
        "outcome": text("resolved", "no_wait", "unresolved_end", "released", "interrupted",
                        "unresolved_exit"),
    }))


def ioctl_rows() -> pd.DataFrame:
    return coerce_faults(pd.DataFrame({
        "enter_ns": int64(1_000, 2_000, 3_000),
        "pid": 20, "tid": int64(21, 22, 23), "comm": text("handler", "fetch, 2", None),
        "ioctl": text("CONTINUE", "API", "nr0x3f"),
        "start": int64(0x7F00_0000_0000, None, 0), "len": int64(4096, None, 0),
        "mode": int64(0, 0xFF, None), "ret": int64(-17, 0, -25), "errno": int64(17, 0, 25),
        "mapped": int64(-17, None, None), "duration_ns": int64(500, 10, 1),
        "woken": int64(0, 0, 0), "exit_ns": int64(1_500, 2_010, 3_001),
    }), IOCTL_COLUMNS)


def written(path: Path, *batches: pd.DataFrame, sink=CsvSink) -> Path:
    out = sink(path)
    for batch in batches:
        (out.write_ioctls if sink is IoctlCsvSink else out.write)(batch)
    out.close()
    return path


def read_back(path: Path, columns=FAULT_COLUMNS, chunk_rows: int = 2) -> pd.DataFrame:
    chunks = list(read_faults(path, chunk_rows=chunk_rows, columns=columns))
    for chunk in chunks:
        assert [str(t) for t in chunk.dtypes] == [dtype for dtype, _ in columns.values()]
    return pd.concat(chunks, ignore_index=True)


# --- round trips --------------------------------------------------------------------------


def test_fault_rows_round_trip(tmp_path):
    """Written in two batches (and an empty one, which writes nothing), read in chunks of two:
    the same rows, values and dtypes; every missing value is an empty cell."""
    rows = fault_rows()
    path = written(tmp_path / "f.csv", rows.iloc[:4], rows.iloc[:0], rows.iloc[4:])
    pd.testing.assert_frame_equal(read_back(path), rows)
    content = path.read_text()
    assert content.startswith(FAULT_HEADER)
    lines = content.splitlines()
    assert lines[3].startswith('1000500,4242,4245,"say ""hi""",,,,,,')  # missing: nothing at all
    assert lines[4] == ',4242,4246,"two' and lines[5].startswith('lines",,0,4096,"anon","wp"')
    assert content.endswith(",,,,\"unresolved_exit\"\n")


def test_text_that_reads_as_missing_elsewhere_stays_text(tmp_path):
    """Only an empty cell is missing: NA, nan, None, null or N/A are thread names like any."""
    names = ["NA", "nan", "NaN", "None", "null", "N/A", "#N/A", "-", "<NA>", " "]
    rows = coerce_faults(pd.DataFrame({"fault_ns": range(len(names)), "pid": 1,
                                       "tid": range(len(names)), "comm": text(*names)}))
    back = read_back(written(tmp_path / "f.csv", rows))
    assert back["comm"].tolist() == names and back["comm"].notna().all()
    assert back["fault_ns"].notna().all() and back["vcpu"].isna().all()


def test_a_file_without_rows(tmp_path):
    path = written(tmp_path / "f.csv")
    assert path.read_text() == FAULT_HEADER
    assert read_back(path).empty


def test_ioctl_rows_round_trip(tmp_path):
    """The ioctl sink takes ioctl rows only (fault rows are another file's)."""
    path = tmp_path / "io.csv"
    sink = IoctlCsvSink(path)
    sink.write(fault_rows())
    sink.write_ioctls(ioctl_rows().iloc[:1])
    sink.write_ioctls(ioctl_rows().iloc[1:])
    sink.close()
    assert path.read_text().startswith(IOCTL_HEADER)
    pd.testing.assert_frame_equal(read_back(path, IOCTL_COLUMNS), ioctl_rows())


# --- the wrong file -----------------------------------------------------------------------


def test_each_reader_refuses_the_other_files_header(tmp_path):
    """Checked when read_faults is called, before any row is read: one line, naming the
    columns (six of each at most)."""
    faults = written(tmp_path / "f.csv", fault_rows())
    ioctl = written(tmp_path / "io.csv", ioctl_rows(), sink=IoctlCsvSink)
    with pytest.raises(UserError) as e:
        read_faults(ioctl)
    assert str(e.value) == (
        f"{ioctl} is not a `uffdtrace record` CSV: missing columns fault_ns, vcpu, addr, page_size, "
        "backing, kind (and 16 more); unexpected columns enter_ns, ioctl, start, len, mode, ret "
        "(and 3 more)")
    with pytest.raises(UserError) as e:
        read_faults(faults, columns=IOCTL_COLUMNS)
    assert str(e.value) == (
        f"{faults} is not a `uffdtrace record` CSV: missing columns enter_ns, ioctl, start, len, "
        "mode, ret (and 3 more); unexpected columns fault_ns, vcpu, addr, page_size, backing, "
        "kind (and 16 more)")


def test_a_header_saved_with_a_byte_order_mark_is_named(tmp_path):
    """As a spreadsheet saves it: the invisible character is shown escaped."""
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + written(tmp_path / "f.csv", fault_rows()).read_bytes())
    with pytest.raises(UserError) as e:
        read_faults(path)
    assert str(e.value) == (f"{path} is not a `uffdtrace record` CSV: missing columns fault_ns; "
                            "unexpected columns \\ufefffault_ns")


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        read_faults(tmp_path / "nope.csv")
    assert str(e.value) == f"cannot read {tmp_path / 'nope.csv'}: No such file or directory"


# --- partial writes -----------------------------------------------------------------------


class Writes:
    """os.write for one file descriptor: at most `most` bytes a call, and ENOSPC once
    `room` bytes have gone to it (other descriptors are written as usual)."""

    def __init__(self, monkeypatch, fd_of, most: int = 1 << 30, room: int = 1 << 62) -> None:
        self.real, self.fd_of, self.most, self.room = os.write, fd_of, most, room
        self.calls = 0
        monkeypatch.setattr(os, "write", self)

    def __call__(self, fd: int, data) -> int:
        if fd != self.fd_of():
            return self.real(fd, data)
        self.calls += 1
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = self.real(fd, bytes(data[:min(self.most, self.room)]))
        self.room -= n
        return n


def test_short_writes_still_write_whole_rows(tmp_path, monkeypatch):
    """A write may take fewer bytes than it is given (a signal, a filling disk): the rest is
    written next, so the file is what one write each would give."""
    rows = fault_rows()
    expected = written(tmp_path / "whole.csv", rows.iloc[:3], rows.iloc[3:]).read_bytes()
    sink = CsvSink(tmp_path / "short.csv")
    writes = Writes(monkeypatch, lambda: sink._fd, most=7)
    sink.write(rows.iloc[:3])
    sink.write(rows.iloc[3:])
    sink.close()
    assert (tmp_path / "short.csv").read_bytes() == expected
    assert writes.calls >= (len(expected) - len(FAULT_HEADER)) // 7


def test_a_failed_write_leaves_the_file_at_its_last_whole_row(tmp_path, monkeypatch):
    """The disk fills up in the middle of the second batch: the OSError names the file, the
    file is cut back to the first batch (report reads it), and the rows count only what is
    in it. A later write goes on from there."""
    rows = fault_rows()
    path = tmp_path / "f.csv"
    sink = CsvSink(path)
    sink.write(rows.iloc[:2])
    size = path.stat().st_size
    Writes(monkeypatch, lambda: sink._fd, most=16, room=40)  # 40 bytes more, then a full disk
    with pytest.raises(OSError) as e:
        sink.write(rows.iloc[2:5])
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(path))
    assert path.stat().st_size == size and sink.rows == 2
    pd.testing.assert_frame_equal(read_back(path), rows.iloc[:2])
    monkeypatch.undo()
    sink.write(rows.iloc[5:])
    sink.close()
    pd.testing.assert_frame_equal(read_back(path), rows.iloc[[0, 1, 5]].reset_index(drop=True))


def test_a_row_cut_short_is_refused_by_the_reader(tmp_path):
    """What a file that could not be cut back keeps (or a copy taken while it was written):
    the reader says the recording was interrupted."""
    path = written(tmp_path / "f.csv", fault_rows())
    content = path.read_bytes()
    path.write_bytes(content[:-10])
    with pytest.raises(UserError) as e:
        read_faults(path)
    assert str(e.value) == f"{path}: the last line is truncated (was the recording interrupted?)"


def test_a_closed_pipe_is_named_and_the_stream_is_not_closed(tmp_path):
    """`record -o -` into a pipe whose reader went away (`| head`): EPIPE naming the stream;
    nothing is cut back (a pipe cannot be), and the sink leaves the stream to its owner."""
    r, w = os.pipe()
    with os.fdopen(r, "rb") as reader, os.fdopen(w, "w") as stream:
        sink = CsvSink(None, stream=stream)
        assert reader.read(len(FAULT_HEADER)) == FAULT_HEADER.encode()
        reader.close()
        with pytest.raises(BrokenPipeError) as e:
            sink.write(fault_rows())
        assert e.value.filename == stream.name and sink.rows == 0
        sink.close()
        assert not stream.closed
