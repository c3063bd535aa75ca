"""Where assembled fault batches go: files, summaries, (later) the TUI and exporters."""

from __future__ import annotations

from typing import Protocol

import pandas as pd


class Sink(Protocol):
    def write(self, faults: pd.DataFrame) -> None: ...

    def close(self) -> None: ...
