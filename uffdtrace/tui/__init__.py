"""The live terminal UI (`uffdtrace top`): panels exposed by plugins, drawn with Textual."""

from uffdtrace.tui.app import StatusLine, TopApp, save_snapshot

__all__ = ["StatusLine", "TopApp", "save_snapshot"]
