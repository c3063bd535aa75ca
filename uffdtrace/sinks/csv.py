"""The CSVs of `uffdtrace record`, per fault (-o) and per uffd ioctl (--ioctls): header first,
one row per record. Each batch goes to the kernel as whole rows, written straight to the file
descriptor (no buffer left behind), so that an interrupted run still leaves a complete, valid
file; when a write fails (a full disk, a closed pipe) a regular file is cut back to its last
complete row and the OSError, naming the file, goes up to the session.

Rows are formatted by Arrow's CSV writer: pandas' to_csv would cost more CPU than the
kernel side at 100k faults/s. Missing values are empty cells.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import TextIO

import pandas as pd
import pyarrow as pa
from pyarrow import csv as pacsv

from uffdtrace.events import FAULT_COLUMNS, IOCTL_COLUMNS

_ROWS_ONLY = pacsv.WriteOptions(include_header=False, quoting_style="needed")


def _arrow(column: pd.Series, dtype: str) -> pa.Array:
    """One column as an Arrow array: pandas' own arrays are Arrow's or convert without a copy."""
    return pa.array(column.array, type=pa.int64() if dtype == "Int64" else pa.large_string())


def arrow_table(rows: pd.DataFrame, columns: dict[str, tuple[str, str]]) -> pa.Table:
    """A batch of rows as an Arrow table of `columns`, in their order (the Parquet sink's too)."""
    return pa.table({name: _arrow(rows[name], dtype) for name, (dtype, _) in columns.items()})


def write_all(fd: int, data: bytes, name: str, regular: bool) -> None:
    """All of `data`, or an OSError naming the file `name`, with a `regular` file cut back to
    where it ended before."""
    end = os.lseek(fd, 0, os.SEEK_CUR) if regular else None
    try:
        view = memoryview(data)
        while view:  # a write can be short: the disk filled up, a signal came
            view = view[os.write(fd, view):]
    except OSError as e:
        if end is not None:
            with contextlib.suppress(OSError):  # a file that cannot be cut keeps a partial row
                os.ftruncate(fd, end)
                os.lseek(fd, end, os.SEEK_SET)
        e.filename = name
        raise


class CsvSink:
    def __init__(self, path: Path | str | None, stream: TextIO | None = None,
                 columns: dict[str, tuple[str, str]] = FAULT_COLUMNS) -> None:
        self.rows = 0
        self.columns = columns
        self.name = str(path) if stream is None else stream.name
        self._own = stream is None
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666) if stream is None \
            else stream.fileno()
        self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._write((",".join(columns) + "\n").encode())

    def write(self, faults: pd.DataFrame) -> None:
        if faults.empty:
            return
        table = arrow_table(faults, self.columns)
        rows = pa.BufferOutputStream()
        pacsv.write_csv(table, rows, write_options=_ROWS_ONLY)
        self._write(rows.getvalue().to_pybytes())
        self.rows += len(faults)

    def _write(self, data: bytes) -> None:
        write_all(self._fd, data, self.name, self._regular)

    def close(self) -> None:
        if self._own:
            os.close(self._fd)


class IoctlCsvSink:
    """`record --ioctls FILE.csv`: one row per uffd ioctl (IOCTL_COLUMNS)."""

    def __init__(self, path: Path | str) -> None:
        self._csv = CsvSink(path, columns=IOCTL_COLUMNS)

    def write(self, faults: pd.DataFrame) -> None:
        """Fault rows are not this file's."""

    def write_ioctls(self, ioctls: pd.DataFrame) -> None:
        self._csv.write(ioctls)

    def close(self) -> None:
        self._csv.close()
