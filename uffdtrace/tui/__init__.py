"""The live terminal UI (`uffdtrace top`): panels exposed by plugins, drawn with Textual."""

from uffdtrace.tui.app import SessionStatus, TopApp, run_top, save_snapshot

__all__ = ["SessionStatus", "TopApp", "run_top", "save_snapshot"]
