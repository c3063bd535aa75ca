"""Where assembled batches go: CSV files, plugins (the TUI's panels among them), summaries.

Every sink takes fault rows; one that also wants the ioctl rows has `write_ioctls`."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pandas as pd


class Sink(Protocol):
    def write(self, faults: pd.DataFrame) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class IoctlSink(Protocol):
    def write_ioctls(self, ioctls: pd.DataFrame) -> None: ...
