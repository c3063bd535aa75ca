"""Analyse a CSV written by `uffdtrace record` with plugins, offline.

Runs the chosen plugins (default: latency, blocktime, hotpages, misuse, timeline; see
`uffdtrace plugins`) over the recorded faults and prints their result tables. With --out DIR
each table is also written as DIR/<plugin>_<table>.csv; the columns of each table are
documented in the plugin's module (e.g. `pydoc uffdtrace_plugins.latency`). --plots adds PNG
figures to DIR (needs matplotlib): the stall histogram, stall over time, blocked time per thread.

With --ioctls, the ioctl records of the same run (`record --ioctls`) go to the plugins too: the
misuse plugin explains failed ioctls from them.

examples:
  uffdtrace report faults.csv
  uffdtrace report faults.csv --ioctls ioctls.csv --plugin misuse
  uffdtrace report faults.csv --plugin latency --plugin ./mine.py --format json
  uffdtrace report faults.csv --opt timeline.interval_s=0.1 --out results --plots
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from uffdtrace.commands.options import add_plugin_arguments, plugin_sink_from_args
from uffdtrace.errors import UserError
from uffdtrace.events import CATEGORIES, FAULT_COLUMNS, IOCTL_COLUMNS, coerce_faults
from uffdtrace.plugins import RunContext
from uffdtrace.sinks.plugins import format_tables

DEFAULT_PLUGINS = ("latency", "blocktime", "hotpages", "misuse", "timeline")
CHUNK_ROWS = 200_000
INTEGER = re.compile(r"-?\d+")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, metavar="FILE.csv", help="CSV written by `uffdtrace record`")
    p.add_argument("--ioctls", type=Path, metavar="IOCTLS.csv",
                   help="the ioctl CSV of the same run (`uffdtrace record --ioctls`)")
    add_plugin_arguments(p, out_flag="--out")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table",
                   help="how results are printed on stdout (default: table)")
    p.add_argument("--plots", action="store_true", help="also write PNG figures into --out DIR")


def run(args: argparse.Namespace) -> int:
    if args.plots:
        if args.plugin_out is None:
            raise UserError("--plots writes PNG files: give them a directory with --out DIR")
        _pyplot()
    faults = read_faults(args.file)  # headers are checked before any plugin starts
    ioctls = read_faults(args.ioctls, columns=IOCTL_COLUMNS) if args.ioctls else iter(())
    ctx = RunContext(targets=(f"file {args.file}",), backend="file", mode="", kernel_release="",
                     live=False)
    sink = plugin_sink_from_args(args, ctx, default=DEFAULT_PLUGINS)
    for chunk in ioctls:
        sink.write_ioctls(chunk)
    rows = 0
    for chunk in faults:
        rows += len(chunk)
        sink.write(chunk)
    sink.close()
    if args.format == "json":
        json.dump({"file": str(args.file), "faults": rows, "failed": sink.failed,
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
        print(f"{rows} faults from {args.file}\n")
        print(format_tables(sink.results), end="")
    if args.plots:
        for path in write_plots(sink.results, args.plugin_out):
            print(f"uffdtrace: wrote {path}", file=sys.stderr)
    return 1 if sink.failed else 0


def read_faults(path: Path, chunk_rows: int = CHUNK_ROWS,
                columns: dict[str, tuple[str, str]] = FAULT_COLUMNS) -> Iterator[pd.DataFrame]:
    """Check that `path` is a complete `record` CSV (of faults, or of `columns`), then yield its
    rows in coerced chunks."""
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
        missing = [c for c in columns if c not in found]
        extra = [c for c in found if c not in columns]
        what = "; ".join(filter(None, [
            missing and "missing columns " + _some(missing),
            extra and "unexpected columns " + _some(extra),
        ])) or "columns out of order"
        raise UserError(f"{path} is not a `uffdtrace record` CSV: {what}")
    if not complete:
        raise UserError(f"{path}: the last line is truncated (was the recording interrupted?)")
    return _chunks(path, chunk_rows, columns)


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
    """PNG figures from the latency, timeline and blocktime tables that are present."""
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
        for (backing, kind), g in stall.groupby(["backing", "kind"]):
            buckets = np.arange(g["bucket"].min(), g["bucket"].max() + 2)
            counts = g.set_index("bucket")["count"].reindex(buckets[:-1], fill_value=0)
            ax.stairs(counts.to_numpy(), 2.0 ** buckets, label=f"{backing} {kind}")
        ax.set(xscale="log", xlabel="stall (us, log2 buckets)", ylabel="faults",
               title="Stall distribution")
        ax.legend()
        save(fig, "latency_stall_histogram.png")

    timeline = results.get("timeline", {}).get("intervals")
    if timeline is not None and not timeline.empty:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot(timeline["t_s"], timeline["p99_stall_ns"].astype("Float64").to_numpy(
            dtype=float, na_value=float("nan")) / 1000, label="p99 stall (us)")
        ax.set(xlabel="time (s)", ylabel="p99 stall (us)", title="Stall over time")
        rate = ax.twinx()
        rate.plot(timeline["t_s"], timeline["faults_per_s"], color="grey", alpha=0.6)
        rate.set_ylabel("faults/s")
        save(fig, "timeline_stall.png")

    threads = results.get("blocktime", {}).get("threads")
    if threads is not None and not threads.empty:
        top = threads.sort_values("blocked_ns", ascending=False).head(30)
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(top) + 1.5))
        ax.barh([f"{p}/{t} {c}" for p, t, c in zip(top["pid"], top["tid"], top["comm"],
                                                     strict=True)],
                top["blocked_ns"].to_numpy(dtype=float, na_value=0.0) / 1e6)
        ax.invert_yaxis()
        ax.set(xlabel="blocked (ms)", title="Blocked time per thread (pid/tid comm)")
        save(fig, "blocktime_threads.png")
    return written
