"""The per-fault CSV of `uffdtrace record`: header first, one row per fault, flushed per batch
so that an interrupted run still leaves a complete, valid file."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

import pandas as pd

from uffdtrace.events import FAULT_COLUMNS


class CsvSink:
    def __init__(self, path: Path | str | None, stream: TextIO | None = None) -> None:
        self.rows = 0
        self._own = stream is None
        self._f = stream if stream is not None else open(path, "w", newline="")  # noqa: SIM115
        self._f.write(",".join(FAULT_COLUMNS) + "\n")
        self._f.flush()

    def write(self, faults: pd.DataFrame) -> None:
        if faults.empty:
            return
        faults.to_csv(self._f, header=False, index=False, lineterminator="\n")
        self._f.flush()  # in the kernel now: a killed tracer still leaves whole rows
        self.rows += len(faults)

    def close(self) -> None:
        if self._own:
            self._f.close()
