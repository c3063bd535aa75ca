"""The Parquet files of `uffdtrace record` (-o FILE.parquet, --ioctls FILE.parquet), for
recordings too big for a CSV: the CSV's columns, in its order, with their types (64-bit
integers and strings, both nullable: an unknown value is null, as it is an empty CSV cell;
backing, kind and outcome as dictionary columns).

Rows are gathered into row groups of at least ROW_GROUP_ROWS (a batch is never split; the last
row group may be smaller), encoded by pyarrow's ParquetWriter in memory, then written to the
file descriptor whole, as the CSV writes its batches. A Parquet file can be read only once its
footer, the index of its row groups, ends it; close() writes it.

When a write fails (a full disk), the file is cut back to its last complete row group and the
OSError, naming the file, goes up to the session; close() then ends the file with a footer for
the row groups before the failed one, so that it stays readable up to there. pyarrow's writer
cannot drop a row group it was given, so that footer comes from a second writer that is given
each row group once it is in the file: encoding is deterministic, so its offsets are the
file's (checked at every row group). A recording killed before close() (SIGKILL, a second
signal) has no footer, and no Parquet reader reads it: where that matters, record CSV.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from uffdtrace.events import CATEGORIES, FAULT_COLUMNS, IOCTL_COLUMNS
from uffdtrace.sinks.csv import arrow_table, write_all

ROW_GROUP_ROWS = 65_536
CATEGORY = pa.dictionary(pa.int32(), pa.string())


def arrow_schema(columns: dict[str, tuple[str, str]] = FAULT_COLUMNS) -> pa.Schema:
    """The Arrow schema of a recording's Parquet file (each field's meaning in its metadata)."""
    def arrow_type(name: str, dtype: str) -> pa.DataType:
        if name in CATEGORIES:
            return CATEGORY
        return pa.int64() if dtype == "Int64" else pa.string()

    return pa.schema([pa.field(name, arrow_type(name, dtype), metadata={"description": meaning})
                      for name, (dtype, meaning) in columns.items()])


def _writer_options(schema: pa.Schema) -> dict:
    # Dictionary encoding only where values repeat: on the timestamps it costs time, not bytes.
    return {"use_dictionary": [f.name for f in schema if not pa.types.is_integer(f.type)]}


class _Memory(io.RawIOBase):
    """What a ParquetWriter writes: kept until taken, or (keep=False) only counted."""

    def __init__(self, keep: bool = True) -> None:
        super().__init__()
        self.keep = keep
        self.size = 0  # bytes written so far: the position in the file
        self._data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.size += n
        if self.keep:
            self._data += data
        return n

    def take(self) -> bytes:
        data, self._data = bytes(self._data), bytearray()
        return data


class ParquetSink:
    """`record -o FILE.parquet`: one row per fault (FAULT_COLUMNS), or of `columns`."""

    def __init__(self, path: Path | str,
                 columns: dict[str, tuple[str, str]] = FAULT_COLUMNS) -> None:
        self.rows = 0  # in the file's complete row groups
        self.columns = columns
        self.name = str(path)
        self.schema = arrow_schema(columns)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._error: OSError | None = None
        self._end = 0  # bytes in the file: the end of its last complete row group
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
            options = _writer_options(self.schema)
            self._out = _Memory()
            self._writer = pq.ParquetWriter(self._out, self.schema, **options)
            self._in_file = _Memory(keep=False)  # what the second writer was given is in the file
            self._second: pq.ParquetWriter | None = pq.ParquetWriter(
                self._in_file, self.schema, **options)
            self._commit()  # the leading magic bytes
        except OSError:
            os.close(self._fd)
            raise

    def write(self, faults: pd.DataFrame) -> None:
        if self._error is not None:
            raise self._error
        if faults.empty:
            return
        self._pending.append(arrow_table(faults, self.columns).cast(self.schema))
        self._pending_rows += len(faults)
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush(counted=self._pending_rows - len(faults))

    def _flush(self, counted: int) -> None:
        """The pending rows as a row group, into the file. On a failure, the error says how
        many of them were taken by earlier writes (and so counted by the caller): lost."""
        table = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        self._writer.write_table(table)
        try:
            self._commit()
        except OSError as e:
            if counted:
                e.strerror = (f"{e.strerror} (and the {counted:,} rows before, held for this "
                              "row group, are not in the file)")
            raise
        self.rows += len(table)
        if self._second is not None:
            self._second.write_table(table)
            if self._in_file.size != self._end:  # not deterministic after all: no footer then
                self._second.close()
                self._second = None

    def _commit(self) -> None:
        """What the writer has encoded, into the file (on a failure, cut back to before it)."""
        data = self._out.take()
        try:
            write_all(self._fd, data, self.name, self._regular)
        except OSError as e:
            self._error = e
            raise
        self._end += len(data)

    def close(self) -> None:
        """Write the pending rows and the footer; after a failed write, only the footer of the
        row groups in the file (when the disk takes it: else the file has none)."""
        try:
            if self._error is None:
                if self._pending:
                    self._flush(counted=self._pending_rows)
                self._writer.close()
                self._commit()
        finally:
            self._writer.close()  # after a failure: into memory only
            if self._second is not None:
                self._in_file.keep = self._error is not None
                self._second.close()
                if self._error is not None:
                    with contextlib.suppress(OSError):  # its error is the first one's
                        write_all(self._fd, self._in_file.take(), self.name, self._regular)
            os.close(self._fd)


class IoctlParquetSink(ParquetSink):
    """`record --ioctls FILE.parquet`: one row per uffd ioctl (IOCTL_COLUMNS)."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(path, columns=IOCTL_COLUMNS)

    def write(self, faults: pd.DataFrame) -> None:
        """Fault rows are not this file's."""

    def write_ioctls(self, ioctls: pd.DataFrame) -> None:
        super().write(ioctls)


def is_parquet(path: Path | str) -> bool:
    """`record` writes Parquet to a file named *.parquet, CSV to any other."""
    return Path(path).suffix.lower() == ".parquet"
