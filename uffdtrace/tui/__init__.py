"""The live terminal UI (`uffdtrace top`): panels exposed by plugins, drawn with Textual."""

from uffdtrace.tui.app import TopApp
from uffdtrace.tui.snapshot import save_snapshot
from uffdtrace.tui.status import StatusLine

__all__ = ["StatusLine", "TopApp", "save_snapshot"]
