"""Analyse recordings of `uffdtrace record` with plugins, offline: one, or several at once.

Runs the chosen plugins (default: latency, blocktime, hotpages, misuse, timeline; see
`uffdtrace plugins`) over the recorded faults and prints their result tables. With --out DIR
each table is also written as DIR/<plugin>_<table>.csv; the columns of each table are
documented in the plugin's module (e.g. `pydoc uffdtrace_plugins.latency`). --plots adds PNG
figures to DIR (needs matplotlib): the stall histogram, stall over time, blocked time per thread.

A recording is a CSV or a Parquet file (`record -o FILE.parquet`), told apart by its content;
they can be mixed. Parquet is read in chunks, and only the columns the plugins ask for. With
several recordings (many hosts' files), every row gets a `source` column: the file's name
without its suffix (its path, where two files share a name). The plugins' tables then have a
`source` column first, and what is per process or per thread is per source: two hosts' pid 42
stay apart.

With --ioctls, the ioctl records of the same runs (`record --ioctls`) go to the plugins too: the
misuse plugin explains failed ioctls from them. Give one per recording, in the same order.

examples:
  uffdtrace report faults.csv
  uffdtrace report faults.csv --ioctls ioctls.csv --plugin misuse
  uffdtrace report faults.csv --plugin latency --plugin ./mine.py --format json
  uffdtrace report faults.csv --opt timeline.interval_s=0.1 --out results --plots
  uffdtrace report hostA.parquet hostB.parquet old.csv --ioctls ioA.parquet ioB.parquet io.csv
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from uffdtrace.commands.options import add_plugin_arguments, plugin_sink_from_args
from uffdtrace.errors import UserError
from uffdtrace.events import (
    CATEGORIES,
    FAULT_COLUMNS,
    IOCTL_COLUMNS,
    SOURCE,
    SOURCE_COLUMN,
    coerce_faults,
)
from uffdtrace.plugins import RunContext
from uffdtrace.sinks.plugins import format_tables

DEFAULT_PLUGINS = ("latency", "blocktime", "hotpages", "misuse", "timeline")
CHUNK_ROWS = 200_000
INTEGER = re.compile(r"-?\d+")
PARQUET_MAGIC = b"PAR1"
PANDAS_TYPES = {pa.int64(): pd.Int64Dtype(), pa.string(): pd.StringDtype("pyarrow")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", type=Path, nargs="*", metavar="FILE",
                   help="recordings of `uffdtrace record`: CSV or Parquet, one or more")
    p.add_argument("--ioctls", type=Path, nargs="+", action="extend", metavar="IOCTLS",
                   help="the ioctl files of the same runs (`uffdtrace record --ioctls`), one per "
                        "FILE in the same order, after the FILEs")
    add_plugin_arguments(p, out_flag="--out")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table",
                   help="how results are printed on stdout (default: table)")
    p.add_argument("--plots", action="store_true", help="also write PNG figures into --out DIR")


def run(args: argparse.Namespace) -> int:
    if args.plots:
        if args.plugin_out is None:
            raise UserError("--plots writes PNG files: give them a directory with --out DIR")
        _pyplot()
    files: list[Path] = args.files
    ioctl_files: list[Path] = args.ioctls or []
    if not files:  # --ioctls takes every name after it
        raise UserError("name the recordings before --ioctls: uffdtrace report FILE [FILE ...] "
                        "--ioctls IOCTLS [IOCTLS ...]" if ioctl_files else
                        "give a recording: uffdtrace report FILE [FILE ...]")
    if ioctl_files and len(ioctl_files) != len(files):
        raise UserError(f"--ioctls: {len(ioctl_files)} files for {len(files)} recordings: give "
                        "one per recording, in the same order")
    labels = source_labels(files) if len(files) > 1 else [None] * len(files)
    # every file is checked before any plugin starts
    faults = [open_recording(path) for path in files]
    ioctls = [open_recording(path, IOCTL_COLUMNS) for path in ioctl_files]
    ctx = RunContext(targets=tuple(f"file {path}" for path in files), backend="file", mode="",
                     kernel_release="", live=False)
    sink = plugin_sink_from_args(args, ctx, default=DEFAULT_PLUGINS)
    for recording, label in zip(ioctls, labels, strict=False):
        for chunk in recording.chunks(source=label):
            sink.write_ioctls(chunk)
    rows: list[int] = []
    for recording, label in zip(faults, labels, strict=True):
        rows.append(0)
        for chunk in recording.chunks(select=sink.columns, source=label):
            rows[-1] += len(chunk)
            sink.write(chunk)
    sink.close()
    total = sum(rows)
    if args.format == "json":
        doc = {"file": str(files[0])} if len(files) == 1 else {"files": [
            {"path": str(path), "source": label, "faults": n}
            for path, label, n in zip(files, labels, rows, strict=True)]}
        json.dump({**doc, "faults": total, "failed": sink.failed,
                   "results": {p: {t: json.loads(df.to_json(orient="records"))
                                   for t, df in tables.items()}
                               for p, tables in sink.results.items()}},
                  sys.stdout, indent=2)
        print()
    elif args.format == "csv":
        for plugin, tables in sink.results.items():
            for table, df in tables.items():
                print(f"# {plugin}_{table}")
                df.to_csv(sys.stdout, index=False, lineterminator="\n")
                print()
    else:
        if len(files) == 1:
            print(f"{total} faults from {files[0]}\n")
        else:
            print(f"{total} faults from {len(files)} recordings (column {SOURCE}):")
            for path, label, n in zip(files, labels, rows, strict=True):
                print(f"  {label}: {n} faults" + ("" if label == str(path) else f" ({path})"))
            print()
        print(format_tables(sink.results), end="")
    if args.plots:
        for path in write_plots(sink.results, args.plugin_out):
            print(f"uffdtrace: wrote {path}", file=sys.stderr)
    return 1 if sink.failed else 0


def source_labels(paths: Sequence[Path]) -> list[str]:
    """Each recording's `source`: its file name without the suffix, or its path (as given)
    where two recordings share a name."""
    stems = Counter(path.stem for path in paths)
    labels = [path.stem if stems[path.stem] == 1 else str(path) for path in paths]
    seen: dict[str, Path] = {}
    for path, label in zip(paths, labels, strict=True):
        if label in seen or any(path.resolve() == other.resolve() for other in seen.values()):
            raise UserError(f"{path} is given twice")
        seen[label] = path
    return labels


@dataclass(frozen=True)
class Recording:
    """A checked recording (CSV or Parquet) of fault rows, or of `columns`."""

    path: Path
    columns: dict[str, tuple[str, str]]
    parquet: pq.ParquetFile | None  # None: a CSV

    def chunks(self, chunk_rows: int = CHUNK_ROWS, select: Sequence[str] | None = None,
               source: str | None = None) -> Iterator[pd.DataFrame]:
        """The rows in chunks, with the columns' dtypes: every column (a CSV's always), or
        those in `select` (Parquet); with the `source` column when given one."""
        if self.parquet is None:
            chunks = _chunks(self.path, chunk_rows, self.columns)
        else:
            wanted = list(self.columns) if select is None else [c for c in self.columns
                                                                  if c in select]
            chunks = _parquet_chunks(self.path, self.parquet, chunk_rows, wanted, self.columns)
        for chunk in chunks:
            if source is not None:
                chunk[SOURCE] = pd.array(np.full(len(chunk), source, dtype=object),
                                         dtype=SOURCE_COLUMN[SOURCE][0])
            yield chunk


def open_recording(path: Path, columns: dict[str, tuple[str, str]] = FAULT_COLUMNS) -> Recording:
    """Check that `path` is a complete recording of `record`: its columns (of faults, or of
    `columns`), and that it ends whole (a CSV with a complete line, a Parquet file with its
    footer). UserError, in one line, otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(PARQUET_MAGIC))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from e
    if head == PARQUET_MAGIC:
        return Recording(path, columns, _open_parquet(path, columns))
    if path.suffix.lower() == ".parquet":
        raise UserError(f"{path} is not a Parquet file (it does not start with "
                        f"{PARQUET_MAGIC.decode()})" if head else f"{path} is empty")
    _check_csv(path, columns)
    return Recording(path, columns, None)


def read_faults(path: Path, chunk_rows: int = CHUNK_ROWS,
                columns: dict[str, tuple[str, str]] = FAULT_COLUMNS) -> Iterator[pd.DataFrame]:
    """Check that `path` is a complete `record` file (CSV or Parquet; of faults, or of
    `columns`), then yield all its rows in chunks with the columns' dtypes."""
    return open_recording(path, columns).chunks(chunk_rows)


def _check_csv(path: Path, columns: dict[str, tuple[str, str]]) -> None:
    try:
        with open(path, "rb") as f:
            first_line = f.readline()
            f.seek(0, 2)
            if f.tell() == 0:
                raise UserError(f"{path} is empty (no CSV header)")
            f.seek(-1, 2)
            complete = f.read(1) == b"\n"
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from e
    try:
        found = first_line.decode().rstrip("\r\n").split(",")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a `uffdtrace record` CSV: its first line is not text") from None
    if found != list(columns):
        what = _column_mismatch(found, columns) or "columns out of order"
        raise UserError(f"{path} is not a `uffdtrace record` CSV: {what}")
    if not complete:
        raise UserError(f"{path}: the last line is truncated (was the recording interrupted?)")


def _column_mismatch(found: list[str], columns: dict[str, tuple[str, str]]) -> str:
    missing = [c for c in columns if c not in found]
    extra = [c for c in found if c not in columns]
    return "; ".join(filter(None, [
        missing and "missing columns " + _some(missing),
        extra and "unexpected columns " + _some(extra),
    ]))


def _open_parquet(path: Path, columns: dict[str, tuple[str, str]]) -> pq.ParquetFile:
    """The Parquet file's footer read, its columns and their types checked."""
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as e:  # ValueError: names not UTF-8
        raise UserError(f"{path}: {_parquet_problem(path, e)}") from e
    found = schema.names
    if what := _column_mismatch(found, columns):
        raise UserError(f"{path} is not a `uffdtrace record` Parquet file: {what}")
    for name, (dtype, _) in columns.items():
        kind = schema.field(name).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        fits = pa.types.is_null(kind) or (
            pa.types.is_integer(kind) if dtype == "Int64"
            else pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind))
        if not fits:
            need = "integers" if dtype == "Int64" else "strings"
            raise UserError(f"{path} is not a `uffdtrace record` Parquet file: column {name} "
                            f"holds {schema.field(name).type}, not {need}")
    return parquet


def _parquet_problem(path: Path, error: Exception) -> str:
    """What is wrong with a Parquet file whose footer cannot be read, in a few words."""
    try:  # magic, footer, its length, magic
        with open(path, "rb") as f:
            footed = f.seek(0, 2) >= 3 * len(PARQUET_MAGIC) and (
                f.seek(-len(PARQUET_MAGIC), 2) and f.read() == PARQUET_MAGIC)
    except OSError:
        footed = False
    if not footed:
        return ("the Parquet file has no footer, which is written last (was the recording "
                "interrupted?)")
    return f"not a readable Parquet file ({_first_line(error)})"


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _parquet_chunks(path: Path, parquet: pq.ParquetFile, chunk_rows: int, wanted: list[str],
                    columns: dict[str, tuple[str, str]]) -> Iterator[pd.DataFrame]:
    """Chunks of `chunk_rows` (the last one smaller) read a record batch at a time, never the
    whole file, as DataFrames with the columns' dtypes; values outside a category's set are
    refused (as in a CSV)."""
    first = 0
    pending: list[pa.RecordBatch] = []  # a chunk ends inside a row group: its rest goes on
    rows = 0
    try:
        for batch in parquet.iter_batches(batch_size=chunk_rows, columns=wanted):
            pending.append(batch)
            rows += batch.num_rows
            while rows >= chunk_rows:
                table = pa.Table.from_batches(pending)
                pending, rows = table.slice(chunk_rows).to_batches(), rows - chunk_rows
                yield _frame(path, table.slice(0, chunk_rows), first, columns)
                first += chunk_rows
        if rows:
            yield _frame(path, pa.Table.from_batches(pending), first, columns)
    except (pa.ArrowException, OSError, ValueError) as e:  # ValueError: text not UTF-8
        raise UserError(f"{path}: after row {first}: {_first_line(e)}") from e


def _frame(path: Path, table: pa.Table, first: int,
           columns: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """Rows `first`... of a Parquet file as a DataFrame with the columns' dtypes."""
    arrays = []
    for name in table.column_names:
        column = table.column(name)
        if name in CATEGORIES:
            _check_parquet_category(path, name, column, first)
        target = pa.int64() if columns[name][0] == "Int64" else pa.string()
        if column.type != target:
            column = column.cast(target)
        arrays.append(column)
    chunk = pa.Table.from_arrays(arrays, names=table.column_names).to_pandas(
        types_mapper=PANDAS_TYPES.get)
    chunk.index = pd.RangeIndex(first, first + len(chunk))
    return chunk


def _check_parquet_category(path: Path, name: str, column: pa.ChunkedArray, first: int) -> None:
    """Refuse the first value outside the column's set (events.CATEGORIES), as in a CSV."""
    allowed = CATEGORIES[name]
    values = [v for chunk in column.chunks for v in (
        chunk.dictionary if pa.types.is_dictionary(chunk.type) else pc.unique(chunk)).to_pylist()]
    if all(v in allowed for v in values if v is not None):
        return
    bad = pc.and_(column.is_valid(), pc.invert(pc.is_in(column.cast(pa.string()),
                                                         pa.array(allowed))))
    row = pc.index(bad, True).as_py()
    raise UserError(f"{path}: row {first + row + 1}: column {name} needs one of "
                    f"{', '.join(allowed)} (or empty), not {column[row].as_py()!r}")


def _chunks(path: Path, chunk_rows: int, columns: dict[str, tuple[str, str]]) -> Iterator[pd.DataFrame]:
    dtypes = {name: dtype for name, (dtype, _) in columns.items()}
    try:
        # index_col=False: with more fields than the header in the first row, pandas would take
        # the first ones as the index and shift every row's values into the wrong columns
        with pd.read_csv(path, dtype=dtypes, chunksize=chunk_rows, keep_default_na=False,
                         na_values=[""], index_col=False) as reader:
            while (chunk := _next_chunk(path, reader)) is not None:
                _check_categories(path, chunk)
                yield coerce_faults(chunk, columns)
    except pd.errors.ParserError as e:
        message = str(e).strip().removeprefix("Error tokenizing data. C error: ")
        raise UserError(f"{path}: {message}") from e
    except UnicodeDecodeError as e:  # a ValueError too: before the integer-cell search
        raise UserError(f"{path}: not UTF-8 text after the header (a binary file?)") from e
    except (ValueError, OverflowError, TypeError) as e:  # TypeError: '1.5' in an Int64 column
        raise UserError(f"{path}: {_bad_cell(path, chunk_rows, dtypes) or e}") from e


def _next_chunk(path: Path, reader: pd.io.parsers.TextFileReader) -> pd.DataFrame | None:
    """The next chunk (None at the end). Rows with more fields than the header are refused:
    with index_col=False pandas drops the extra values with only a warning (later rows with
    more fields than the first are a ParserError)."""
    with warnings.catch_warnings():  # around the read only: the caller's code runs between chunks
        warnings.simplefilter("error", pd.errors.ParserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's, casting '1e30' before the ValueError
        try:
            return next(reader)
        except StopIteration:
            return None
        except pd.errors.ParserWarning:
            raise UserError(f"{path}: a row has more fields than the header") from None


def _check_categories(path: Path, chunk: pd.DataFrame) -> None:
    """Refuse the first value outside its column's set (events.CATEGORIES): plugins would
    report it as one more category."""
    bad = pd.DataFrame({name: chunk[name].notna() & ~chunk[name].isin(allowed)
                        for name, allowed in CATEGORIES.items() if name in chunk})
    if not bad.to_numpy().any():
        return
    row = bad.any(axis=1).idxmax()
    name = bad.loc[row].idxmax()
    raise UserError(f"{path}: line {int(row) + 2}: column {name} needs one of "
                    f"{', '.join(CATEGORIES[name])} (or empty), not {chunk.at[row, name]!r}")


def _some(names: list[str], most: int = 6) -> str:
    """Up to `most` column names, each shortened and with control characters escaped (a lone
    \\r would overwrite the line on a terminal): the header may be anything."""
    printable = ["".join(c if c.isprintable() else repr(c)[1:-1] for c in n) for n in names[:most]]
    shown = [n if len(n) <= 30 else n[:27] + "..." for n in printable]
    return ", ".join(shown) + (f" (and {len(names) - most} more)" if len(names) > most else "")


def _bad_cell(path: Path, chunk_rows: int, dtypes: dict[str, str]) -> str | None:
    """Where the first value that is not an integer (of 64 bits) sits in an integer column."""
    integer = [n for n, dtype in dtypes.items() if dtype == "Int64"]
    with pd.read_csv(path, dtype=str, usecols=integer, chunksize=chunk_rows,
                     keep_default_na=False, index_col=False) as reader:
        for first, chunk in enumerate(reader):
            for name in integer:
                values = chunk[name]
                is_int = np.array(values.str.fullmatch(INTEGER), dtype=bool)
                fits = is_int.copy()
                long = np.flatnonzero(is_int & np.array(values.str.len() > 18))
                fits[long] = [-(2**63) <= int(v) < 2**63 for v in values.iloc[long]]  # Int64's range
                bad = np.flatnonzero(np.array(values != "") & ~fits)
                if len(bad):
                    line = first * chunk_rows + int(bad[0]) + 2
                    what = "a 64-bit integer" if is_int[bad[0]] else "an integer"
                    return f"line {line}: column {name} needs {what}, not {values.iloc[bad[0]]!r}"
    return None


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plots needs matplotlib: install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(results: dict[str, dict[str, pd.DataFrame]], out_dir: Path) -> list[Path]:
    """PNG figures from the latency, timeline and blocktime tables that are present (over
    several recordings, one curve or bar per recording and what it stands for)."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)

    hist = results.get("latency", {}).get("histogram")
    if hist is not None and (hist["metric"] == "stall_ns").any():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        stall = hist[hist["metric"] == "stall_ns"]
        for key, g in stall.groupby([c for c in (SOURCE, "backing", "kind") if c in stall]):
            buckets = np.arange(g["bucket"].min(), g["bucket"].max() + 2)
            counts = g.set_index("bucket")["count"].reindex(buckets[:-1], fill_value=0)
            ax.stairs(counts.to_numpy(), 2.0 ** buckets, label=" ".join(map(str, key)))
        ax.set(xscale="log", xlabel="stall (us, log2 buckets)", ylabel="faults",
               title="Stall distribution")
        ax.legend()
        save(fig, "latency_stall_histogram.png")

    timeline = results.get("timeline", {}).get("intervals")
    if timeline is not None and not timeline.empty:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        rate = ax.twinx()
        for source, t in (timeline.groupby(SOURCE) if SOURCE in timeline else [(None, timeline)]):
            line, = ax.plot(t["t_s"], t["p99_stall_ns"].astype("Float64").to_numpy(
                dtype=float, na_value=float("nan")) / 1000,
                label="p99 stall (us)" if source is None else f"{source}: p99 stall (us)")
            if source is None:
                rate.plot(t["t_s"], t["faults_per_s"], color="grey", alpha=0.6)
            else:
                rate.plot(t["t_s"], t["faults_per_s"], color=line.get_color(), alpha=0.4,
                          linestyle=":")
        ax.set(xlabel="time (s)", ylabel="p99 stall (us)", title="Stall over time")
        if SOURCE in timeline:
            ax.legend()
        rate.set_ylabel("faults/s" + ("" if SOURCE not in timeline else " (dotted)"))
        save(fig, "timeline_stall.png")

    threads = results.get("blocktime", {}).get("threads")
    if threads is not None and not threads.empty:
        top = threads.sort_values("blocked_ns", ascending=False).head(30)
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(top) + 1.5))
        sources = top[SOURCE] if SOURCE in top else [None] * len(top)
        ax.barh([f"{'' if s is None else f'{s} '}{p}/{t} {c}" for s, p, t, c in zip(
                    sources, top["pid"], top["tid"], top["comm"], strict=True)],
                top["blocked_ns"].to_numpy(dtype=float, na_value=0.0) / 1e6)
        ax.invert_yaxis()
        what = "source pid/tid comm" if SOURCE in top else "pid/tid comm"
        ax.set(xlabel="blocked (ms)", title=f"Blocked time per thread ({what})")
        save(fig, "blocktime_threads.png")
    return written
