"""The per-fault CSV of `uffdtrace record`, as a plugin (option path): the same writer, so a
file written here is exactly what `record -o` writes and `report` reads. No result tables."""

from __future__ import annotations

from typing import Any, ClassVar

import pandas as pd

from uffdtrace.plugins import Plugin, RunContext
from uffdtrace.sinks.csv import CsvSink


class CsvPlugin(Plugin):
    name = "csv"
    description = "per-fault CSV, as `record -o` writes it (option path)"
    options: ClassVar[dict[str, Any]] = {"path": "faults.csv"}

    def start(self, ctx: RunContext) -> None:
        self._sink = CsvSink(ctx.options["path"])

    def batch(self, df: pd.DataFrame) -> None:
        self._sink.write(df)

    def finish(self) -> dict[str, pd.DataFrame]:
        self._sink.close()
        return {}
