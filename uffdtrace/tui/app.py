"""`uffdtrace top`: a Textual app drawing the panels that plugins expose.

The UI thread never drains the ring buffer nor runs a plugin: the session drains in a worker
thread (`uffdtrace top` starts it), plugins work in the host's threads and publish panels after
each tick, and the app only reads those panels and the session's status snapshots on a timer.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import RenderableType
from rich.text import Text as RichText
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Footer, Input, Static

from uffdtrace.plugins import Histogram, Panel, Rates, Table, View
from uffdtrace.sinks.plugins import PluginSink
from uffdtrace.tui.render import render_view
from uffdtrace.tui.snapshot import save_snapshot

NARROW_COLUMNS = 3  # tables with at most this many columns stack in the right-hand column


class PanelBox(Widget):
    """One plugin panel: draws the view chosen by the app's metric key, fitted to its size."""

    DEFAULT_CSS = """
    PanelBox { border: round $primary; width: 1fr; height: 1fr; padding: 0 1; }
    PanelBox.table { padding: 0; }
    PanelBox.rates { height: auto; }
    """

    def __init__(self, key: str, panel: Panel) -> None:
        super().__init__(id="panel-" + re.sub(r"[^\w-]", "_", key))
        self.key = key
        self.panel = panel
        if isinstance(panel.views[0], Rates | Table):
            self.add_class(type(panel.views[0]).__name__.lower())

    @property
    def view(self) -> View:
        return self.panel.views[self.app.metric % len(self.panel.views)]

    def show(self, panel: Panel) -> None:
        self.panel = panel
        count = len(panel.views)
        self.border_title = self.view.title + (
            f" [{self.app.metric % count + 1}/{count} m]" if count > 1 else "")
        self.refresh(layout=isinstance(panel.views[0], Rates))

    def on_mount(self) -> None:
        self.show(self.panel)

    def get_content_height(self, container, viewport, width: int) -> int:
        view = self.panel.views[0]
        per_rate = 2 if self.app.size.height >= 36 else 1
        return len(view.rates) * per_rate if isinstance(view, Rates) else super().get_content_height(
            container, viewport, width)

    def render(self) -> RenderableType:
        app: TopApp = self.app
        view = self.view
        size = self.content_size
        try:
            sort = None
            if isinstance(view, Table) and app.sort_shift:
                sort = (view.sort + app.sort_shift) % len(view.columns)
            return render_view(view, size.width, size.height, log_scale=app.log_scale,
                               sort=sort, pid=app.pid_filter)
        except Exception as e:  # a plugin's odd data must not take the screen down
            return RichText(f"cannot draw this panel: {type(e).__name__}: {e}", style="red")


class PidPrompt(ModalScreen[int | None]):
    """Asks for the pid to filter tables by (empty: no filter)."""

    DEFAULT_CSS = """
    PidPrompt { align: center middle; }
    PidPrompt Input { width: 40; border: round $accent; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel")]  # noqa: RUF012

    def compose(self) -> ComposeResult:
        yield Input(placeholder="pid (empty: all)", type="integer")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(int(event.value) if event.value.strip() else None)

    def action_cancel(self) -> None:
        self.dismiss(self.app.pid_filter)


class TopApp(App[None]):
    """Live histograms, rates and tables from the plugins of `host`, with a status line."""

    TITLE = "uffdtrace top"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #status { dock: top; height: 1; background: $panel; padding: 0 1; }
    #hists, #bottom { height: 1fr; }
    #rates { height: auto; }
    #wide { width: 1fr; }
    #narrow { width: 26; }
    """
    BINDINGS = [  # noqa: RUF012
        Binding("p", "pause", "Pause"),
        Binding("r", "reset", "Reset"),
        Binding("m", "metric", "Metric"),
        Binding("l", "scale", "Lin/Log"),
        Binding("o", "sort", "Sort"),
        Binding("f", "filter", "Pid"),
        Binding("s", "save", "Save"),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(self, host: PluginSink, status: Callable[[], str], *, interval_s: float = 0.5,
                 done: Callable[[], bool] = lambda: False, snapshot_dir: Path = Path()) -> None:
        """`status`: the status line; `done`: when true the app exits (e.g. the traced command
        ended); `snapshot_dir`: where the save key writes."""
        super().__init__()
        self.host = host
        self.status = status
        self.interval_s = interval_s
        self.done = done
        self.snapshot_dir = snapshot_dir
        self.paused = False
        self.metric = 0
        self.log_scale = False
        self.sort_shift = 0
        self.pid_filter: int | None = None
        self.boxes: dict[str, PanelBox] = {}
        self.failed: set[str] = set()

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        yield Horizontal(id="hists")
        yield Vertical(id="rates")
        with Horizontal(id="bottom"):
            yield Vertical(id="wide")
            yield Vertical(id="narrow")
        yield Footer()

    def on_mount(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            loop.add_signal_handler(sig, self.exit)
        self.update()
        self.set_interval(self.interval_s, self.update)

    def on_unmount(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            loop.remove_signal_handler(sig)

    def update(self) -> None:
        """Timer: exit when done, else read the plugins' latest panels and the status."""
        if not self.is_running:  # shutting down: its screen may already be gone, timers not yet
            return
        if self.done():
            self.exit()
            return
        for name in set(self.host.failed) - self.failed:
            self.failed.add(name)
            self.notify(f"plugin {name} failed and was disabled", severity="error", timeout=10)
        if not self.paused:
            self.show_panels(self.host.panels())
        flags = [f"pid {self.pid_filter}" if self.pid_filter is not None else "",
                 "log scale" if self.log_scale else "", "PAUSED" if self.paused else ""]
        self.query_one("#status", Static).update(" · ".join(filter(None, [self.status(), *flags])))

    def show_panels(self, panels: dict[str, list[Panel]]) -> None:
        current = {f"{plugin}.{p.name}": p for plugin, ps in panels.items() for p in ps if p.views}
        for key in self.boxes.keys() - current.keys():
            self.boxes.pop(key).remove()
        for key, panel in current.items():
            if key in self.boxes:
                self.boxes[key].show(panel)
            else:
                self.boxes[key] = PanelBox(key, panel)
                self.query_one(self.place(panel.views[0]), Widget).mount(self.boxes[key])
        for area in ("#wide", "#narrow", "#hists", "#rates"):
            box = self.query_one(area, Widget)
            box.display = bool(box.children)
        self.query_one("#bottom").display = any(
            self.query_one(a, Widget).children for a in ("#wide", "#narrow"))

    @staticmethod
    def place(view: View) -> str:
        if isinstance(view, Histogram):
            return "#hists"
        if isinstance(view, Rates):
            return "#rates"
        if isinstance(view, Table) and len(view.columns) <= NARROW_COLUMNS:
            return "#narrow"
        return "#wide"

    def redraw(self) -> None:
        for box in self.boxes.values():
            box.show(box.panel)
        self.update()

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.update()

    def action_reset(self) -> None:
        self.host.reset()
        self.notify("reset: panels start afresh", timeout=3)

    def action_metric(self) -> None:
        self.metric += 1
        self.redraw()

    def action_scale(self) -> None:
        self.log_scale = not self.log_scale
        self.redraw()

    def action_sort(self) -> None:
        self.sort_shift += 1
        self.redraw()

    def action_filter(self) -> None:
        def chosen(pid: int | None) -> None:
            self.pid_filter = pid
            self.redraw()

        self.push_screen(PidPrompt(), chosen)

    def action_save(self) -> None:
        """Every histogram and table view of the moment, as CSV files in a new directory."""
        out = self.snapshot_dir / time.strftime("uffdtrace-snapshot-%Y%m%d-%H%M%S")
        try:
            paths = save_snapshot({k: b.panel for k, b in self.boxes.items()}, out)
        except OSError as e:
            self.notify(f"cannot save the snapshot: {e}", severity="error")
            return
        self.notify(f"saved {len(paths)} CSV files in {out}", timeout=6)
