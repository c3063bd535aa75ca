"""The CSVs of `uffdtrace record`, per fault (-o) and per uffd ioctl (--ioctls): header first,
one row per record, flushed per batch so that an interrupted run still leaves a complete,
valid file.

Rows are formatted by Arrow's CSV writer: pandas' to_csv would cost more CPU than the
kernel side at 100k faults/s. Missing values are empty cells.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np
import pandas as pd
import pyarrow as pa
from pyarrow import csv as pacsv

from uffdtrace.events import FAULT_COLUMNS, IOCTL_COLUMNS

_ROWS_ONLY = pacsv.WriteOptions(include_header=False, quoting_style="needed")


def _arrow(column: pd.Series, dtype: str) -> pa.Array:
    """One column as an Arrow array, built from plain numpy (pandas' own conversion of its
    string arrays garbles them with the pyarrow in use here)."""
    missing = column.isna().to_numpy()
    if dtype == "Int64":
        return pa.array(column.to_numpy(dtype=np.int64, na_value=0), mask=missing)
    return pa.array(column.to_numpy(dtype=object, na_value=None), type=pa.string())


class CsvSink:
    def __init__(self, path: Path | str | None, stream: TextIO | None = None,
                 columns: dict[str, tuple[str, str]] = FAULT_COLUMNS) -> None:
        self.rows = 0
        self.columns = columns
        self._own = stream is None
        self._f: BinaryIO = open(path, "wb") if stream is None else stream.buffer  # noqa: SIM115
        self._f.write((",".join(columns) + "\n").encode())
        self._f.flush()

    def write(self, faults: pd.DataFrame) -> None:
        if faults.empty:
            return
        table = pa.table({name: _arrow(faults[name], dtype)
                          for name, (dtype, _) in self.columns.items()})
        rows = pa.BufferOutputStream()
        pacsv.write_csv(table, rows, write_options=_ROWS_ONLY)
        self._f.write(rows.getvalue().to_pybytes())
        self._f.flush()  # in the kernel now: a killed tracer still leaves whole rows
        self.rows += len(faults)

    def close(self) -> None:
        if self._own:
            self._f.close()


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
