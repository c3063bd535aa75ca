"""The plugin host: a sink that feeds fault batches to plugins and collects their tables.

Isolation: a plugin that raises in any hook is disabled with one line on stderr naming it and
the error; the others go on, and `failed` lists it (the command then exits non-zero).

Live, each plugin has a worker thread behind a bounded queue, so a slow plugin never blocks
the tracer's drain loop: when its queue is full the batch is skipped for that plugin and its
rows are counted in `skipped_rows`, reported at the end. A plugin falling behind (its queue
more than half full, or batches skipped) is also reported while the run goes on, at most once
per BEHIND_WARN_S. At close the plugins get SHUTDOWN_S in total to work off their queues; one
still busy then is cut: what it had not processed is counted and named, and it gives no tables
(it is in `cut`, and the command exits non-zero). Offline (report) the host runs the plugins
synchronously, in the caller's thread, and skips nothing. A plugin that names its columns gets
those, and the `source` column of `report` over several recordings when the rows have it.

For live viewers (`panels=True`) each worker also asks its plugin for panels after every tick;
`panels()` returns the latest ones without waiting for any plugin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from uffdtrace.events import FAULT_COLUMNS, SOURCE_COLUMN
from uffdtrace.plugins import Panel, Plugin, PluginInfo, RunContext

QUEUE_BATCHES = 64
TICK_S = 1.0
SHUTDOWN_S = 2.0  # at close, for all live plugins together to work off their queues
BEHIND_WARN_S = 10.0  # a plugin falling behind is reported at most this often
ADDRESS_COLUMNS = ("addr", "page", "region")


@dataclasses.dataclass
class _Tally:
    """Batches handed to a plugin (or not), with their fault and ioctl rows."""

    batches: int = 0
    faults: int = 0
    ioctls: int = 0

    def add(self, hook: str, rows: int) -> None:
        self.batches += 1
        if hook == "batch":
            self.faults += rows
        else:
            self.ioctls += rows

    def __sub__(self, other: _Tally) -> _Tally:
        return _Tally(self.batches - other.batches, self.faults - other.faults,
                      self.ioctls - other.ioctls)


class _Hosted:
    """One plugin instance, its state in the host and (live) its worker thread."""

    def __init__(self, host: PluginSink, info: PluginInfo, ctx: RunContext) -> None:
        self.host = host
        self.name = info.name
        self.plugin: Plugin = info.cls()
        self.columns = list(info.cls.columns) if info.cls.columns is not None else None
        self.failed = False
        self.skipped = _Tally()  # its queue was full
        self.offered = _Tally()  # queued for its worker
        self.done = _Tally()  # worked off by its worker
        self.unprocessed: _Tally | None = None  # cut at the shutdown deadline: what it had left
        self.warned_s = -math.inf
        self.warned_skips = 0
        self.results: dict[str, pd.DataFrame] = {}
        self.panels: list[Panel] = []
        self.reset_due = False
        self.call("start", self.plugin.start, ctx)
        self.queue: queue.Queue[tuple[str, pd.DataFrame] | None] | None = None
        if ctx.live:
            self.queue = queue.Queue()  # bounded by offer(), so that its end can always be put
            self.thread = threading.Thread(target=self.work, name=f"plugin-{self.name}",
                                           daemon=True)
            self.thread.start()

    def call(self, hook: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one hook; on an exception disable the plugin and say so once."""
        if self.failed:
            return None
        try:
            return fn(*args)
        except Exception as e:
            self.failed = True
            print(f"uffdtrace: plugin {self.name} failed in {hook}(): {type(e).__name__}: {e}; "
                  "disabled", file=self.host.err, flush=True)
            return None

    def feed(self, df: pd.DataFrame, hook: str = "batch") -> None:
        """Hand fault rows (hook "batch") or ioctl rows (hook "ioctls") to the plugin."""
        # Each plugin gets its own frame (copy-on-write: cheap), so none sees another's edits.
        if hook == "ioctls":
            self.call(hook, self.plugin.ioctls, df.copy(deep=False))
            return
        if self.columns is None:
            view = df.copy(deep=False)
        else:  # with the source of each row, when several recordings are replayed
            columns = self.columns + [c for c in SOURCE_COLUMN if c in df and c not in self.columns]
            missing = set(columns) - set(df.columns)
            if missing:
                raise KeyError(f"no column {', '.join(sorted(missing))} in the rows")
            view = df.reindex(columns=columns)  # as df[columns], at half the cost
        self.call(hook, self.plugin.batch, view)

    def offer(self, df: pd.DataFrame, hook: str = "batch") -> None:
        """Live: hand a batch to the worker without ever waiting."""
        if self.failed:
            return
        if self.queue.qsize() >= self.host.queue_batches:  # only this thread puts
            self.skipped.add(hook, len(df))
        else:
            self.offered.add(hook, len(df))
            self.queue.put((hook, df))

    def behind(self) -> str | None:
        """A warning if the queue is more than half full or batches were skipped since the
        last one, at most once per BEHIND_WARN_S."""
        queued, now = self.queue.qsize(), time.monotonic()
        if now - self.warned_s < BEHIND_WARN_S or (
                queued <= self.host.queue_batches // 2 and self.skipped.batches == self.warned_skips):
            return None
        self.warned_s, self.warned_skips = now, self.skipped.batches
        return (f"uffdtrace: plugin {self.name} is falling behind: {queued} of "
                f"{self.host.queue_batches} batches queued, {self.skipped.batches} skipped so far")

    def work(self) -> None:
        next_tick = time.monotonic() + self.host.tick_s
        while True:
            try:
                item = self.queue.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                pass
            else:
                if item is None:
                    return
                hook, df = item
                self.feed(df, hook)
                self.done.add(hook, len(df))
            if self.reset_due:
                self.reset_due = False
                self.call("reset", self.plugin.reset)
            if time.monotonic() >= next_tick:
                self.call("tick", self.plugin.tick, time.monotonic_ns())
                if self.host.want_panels:
                    self.refresh_panels()
                next_tick = time.monotonic() + self.host.tick_s

    def refresh_panels(self) -> None:
        self.panels = self.call("panels", self._panels) or []

    def _panels(self) -> list[Panel]:
        panels = self.plugin.panels()
        if not (isinstance(panels, list) and all(isinstance(p, Panel) for p in panels)):
            raise TypeError("panels() must return list[Panel]")
        return panels

    def end(self) -> None:
        """Live: no more batches; the worker returns once it has worked off its queue."""
        if self.queue is not None:
            self.queue.put(None)

    def finish(self, deadline_s: float) -> None:
        """Collect the tables, unless the worker is still busy with batches at `deadline_s`
        (time.monotonic()): then the plugin is cut."""
        if self.queue is not None:
            self.thread.join(max(0.0, deadline_s - time.monotonic()))
            if self.thread.is_alive() and self._cut():
                return
            self.thread.join()  # past its last batch
        self.results = self.call("finish", self._finish) or {}

    def _cut(self) -> bool:
        """Take the queue back; if the end was still in it, count what the worker has not
        processed (its current batch too) and let it return after that batch."""
        left = []
        with contextlib.suppress(queue.Empty):
            while True:
                left.append(self.queue.get_nowait())
        if not left or left[-1] is not None:
            return False
        self.unprocessed = self.offered - self.done
        self.queue.put(None)
        return True

    def _finish(self) -> dict[str, pd.DataFrame]:
        tables = self.plugin.finish()
        if not (isinstance(tables, dict) and all(
                isinstance(k, str) and isinstance(v, pd.DataFrame) for k, v in tables.items())):
            raise TypeError("finish() must return dict[str, DataFrame]")
        return tables


class PluginSink:
    """A sink (write/close) running plugins; `results` holds their tables after close()."""

    def __init__(self, plugins: Sequence[PluginInfo], ctx: RunContext,
                 options: dict[str, dict[str, Any]] | None = None, *,
                 queue_batches: int = QUEUE_BATCHES, tick_s: float = TICK_S,
                 shutdown_s: float = SHUTDOWN_S, out_dir: Path | None = None,
                 stream: TextIO | None = None, err: TextIO | None = None,
                 panels: bool = False) -> None:
        """Start every plugin. `options`: per plugin name (defaults when absent). At close,
        tables go as CSV files into `out_dir` and as text to `stream`, when given. `panels`: a
        live viewer will call panels()."""
        self.want_panels = panels
        self.queue_batches = queue_batches
        self.tick_s = tick_s
        self.shutdown_s = shutdown_s
        self.out_dir = out_dir
        self.stream = stream
        self.err = err if err is not None else sys.stderr
        self.live = ctx.live
        options = options or {}
        self._hosted = [
            _Hosted(self, info, dataclasses.replace(
                ctx, options=options.get(info.name, dict(info.cls.options))))
            for info in plugins
        ]
        self.results: dict[str, dict[str, pd.DataFrame]] = {}

    def write(self, faults: pd.DataFrame) -> None:
        self._hand(faults, "batch")

    def write_ioctls(self, ioctls: pd.DataFrame) -> None:
        self._hand(ioctls, "ioctls")

    def _hand(self, df: pd.DataFrame, hook: str) -> None:
        if df.empty:
            return
        for h in self._hosted:
            if not self.live:
                h.feed(df, hook)
                continue
            h.offer(df, hook)
            if not self.want_panels and (warning := h.behind()):  # a viewer has a status line
                print(warning, file=self.err, flush=True)

    def close(self) -> None:
        deadline_s = time.monotonic() + self.shutdown_s
        for h in self._hosted:
            h.end()
        for h in self._hosted:
            h.finish(deadline_s)
            if h.skipped.batches:
                ioctls = f" and {h.skipped.ioctls} ioctl rows" if h.skipped.ioctls else ""
                print(f"uffdtrace: plugin {h.name} fell behind: {h.skipped.faults} fault rows"
                      f"{ioctls} skipped", file=self.err)
            if h.unprocessed is not None:
                left = h.unprocessed
                ioctls = f", {left.ioctls:,} ioctls" if left.ioctls else ""
                print(f"uffdtrace: plugin {h.name} skipped {left.batches} batches "
                      f"({left.faults:,} faults{ioctls}) at shutdown: still busy "
                      f"{self.shutdown_s:g} s after tracing stopped, so no tables", file=self.err)
        self.results = {h.name: h.results for h in self._hosted if h.results}
        if self.out_dir is not None:
            write_tables(self.results, self.out_dir)
        if self.stream is not None:
            print(format_tables(self.results), file=self.stream)

    def panels(self) -> dict[str, list[Panel]]:
        """Each working plugin's latest panels (live: as of its last tick; offline: now)."""
        if not self.live:
            for h in self._hosted:
                h.refresh_panels()
        return {h.name: h.panels for h in self._hosted if not h.failed}

    def reset(self) -> None:
        """Ask every plugin to start its panels afresh (live: before its next batch)."""
        for h in self._hosted:
            if self.live:
                h.reset_due = True
            else:
                h.call("reset", h.plugin.reset)

    @property
    def columns(self) -> list[str] | None:
        """The fault columns the plugins read, in FAULT_COLUMNS order (None: all of them)."""
        if any(h.columns is None for h in self._hosted):
            return None
        wanted = {c for h in self._hosted for c in h.columns}
        return [c for c in FAULT_COLUMNS if c in wanted]

    @property
    def failed(self) -> list[str]:
        """Names of the plugins disabled by an exception."""
        return [h.name for h in self._hosted if h.failed]

    @property
    def cut(self) -> list[str]:
        """Names of the plugins still busy at the shutdown deadline (they gave no tables)."""
        return [h.name for h in self._hosted if h.unprocessed is not None]

    @property
    def skipped_rows(self) -> dict[str, int]:
        """Fault rows each plugin missed because its queue was full (live only)."""
        return {h.name: h.skipped.faults for h in self._hosted}


def write_tables(results: dict[str, dict[str, pd.DataFrame]], out_dir: Path) -> list[Path]:
    """One CSV per result table: OUT_DIR/<plugin>_<table>.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for plugin, tables in results.items():
        for table, df in tables.items():
            path = out_dir / f"{plugin}_{table}.csv"
            df.to_csv(path, index=False, lineterminator="\n")
            paths.append(path)
    return paths


def format_tables(results: dict[str, dict[str, pd.DataFrame]], max_rows: int = 40) -> str:
    """Readable text for every result table (long tables cut to `max_rows`, addresses in
    hex)."""
    parts = []
    for plugin, tables in results.items():
        for table, df in tables.items():
            parts.append(f"== {plugin}: {table} ({len(df)} rows) ==")
            if df.empty:
                parts.append("(empty)")
                continue
            shown = df.head(max_rows)
            hex_cols = [c for c in ADDRESS_COLUMNS if c in shown and shown[c].dtype.kind in "iu"]
            parts.append(shown.to_string(index=False, formatters=dict.fromkeys(hex_cols, _hex)))
            if len(df) > max_rows:
                parts.append(f"... {len(df) - max_rows} more rows (all of them with --out DIR)")
        parts.append("")
    return "\n".join(parts)


def _hex(value: Any) -> str:
    return "<NA>" if pd.isna(value) else hex(value)
