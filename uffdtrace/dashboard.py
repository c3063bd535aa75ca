"""The Grafana dashboard of `uffdtrace export`, as data.

`SECTIONS` holds the panels: each a title, a panel type (heatmap, timeseries or stat), a Grafana
unit and its PromQL queries with their legends. `dashboard_json()` lays them out into a Grafana
dashboard (schemaVersion 39, with a `datasource` variable for the Prometheus to read), which
`python -m uffdtrace.dashboard` writes to stdout; docs/grafana/uffdtrace-dashboard.json is that
output. `panel_queries()` gives every query with `$__rate_interval` replaced, to run them
against a Prometheus without Grafana (the tests, docs/render_dashboard.py).

The metrics are those of `uffdtrace export`: times in seconds, histograms with buckets at powers
of two of 1 µs. Fault metrics carry the labels chosen by `--labels` (default comm, backing,
kind); a query that groups by a label not chosen still works and shows it empty.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

RATE = "$__rate_interval"
GRID_WIDTH = 24  # Grafana's grid has 24 columns
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""  # Grafana legend format: {{label}} is the series' label


@dataclass(frozen=True)
class Panel:
    title: str
    type: str  # "heatmap", "timeseries" or "stat"
    unit: str  # Grafana unit: s, ops, percentunit, bytes, short
    queries: tuple[Query, ...]
    description: str = ""
    width: int = 12  # grid columns, of 24
    height: int = 8  # grid rows (30 px each)
    red_from: float | None = None  # stat: the value turns red from this value on


def _q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def _quantiles(metric: str, by: str, legend: str, qs: tuple[float, ...] = (0.5, 0.99)) -> tuple[Query, ...]:
    """histogram_quantile of `metric` per `by`, one query per quantile."""
    return tuple(
        _q(f"histogram_quantile({q:g}, sum by ({by}, le) (rate({metric}_bucket[{RATE}])))",
           f"{legend} p{q * 100:g}")
        for q in qs)


RESOLVING = "continue|copy|zeropage|move|poison|wake"

FAULTS = [
    Panel("Fault stall (heatmap)", "heatmap", "s",
          (_q(f"sum by (le) (rate(uffdtrace_fault_stall_seconds_bucket[{RATE}]))", "{{le}}"),),
          "Faults per second by stall: how long the faulting thread could not run, from its "
          "touch to the moment it ran again.", width=24, height=9),
    Panel("Stall p50 / p99 by process", "timeseries", "s",
          _quantiles("uffdtrace_fault_stall_seconds", "comm", "{{comm}}"),
          "Quantiles of the stall per process name (needs the comm label, on by default)."),
    Panel("Faults/s by backing and kind", "timeseries", "ops",
          (_q(f"sum by (backing, kind) (rate(uffdtrace_faults_total[{RATE}]))", "{{backing}} {{kind}}"),),
          "Backing: shmem, hugetlb or anon. Kind: minor, missing or wp."),
    Panel("Blocked time by process", "timeseries", "percentunit",
          (_q(f"sum by (comm) (rate(uffdtrace_blocked_seconds_total[{RATE}]))", "{{comm}}"),),
          "Seconds of stall per second (100 % = one thread blocked all the time)."),
    Panel("Stall phases p99", "timeseries", "s",
          (_q("histogram_quantile(0.99, sum by (le) "
              f"(rate(uffdtrace_fault_notify_seconds_bucket[{RATE}])))", "notify"),
           _q("histogram_quantile(0.99, sum by (le) "
              f"(rate(uffdtrace_fault_handler_seconds_bucket[{RATE}])))", "handler"),
           _q("histogram_quantile(0.99, sum by (le) "
              f"(rate(uffdtrace_fault_wake_to_run_seconds_bucket[{RATE}])))", "wake to run")),
          "Parts of the stall: from sleeping until the handler has the message (notify), the "
          "handler's work before its resolving ioctl (handler), and from the wakeup until the "
          "thread runs (wake to run). Empty when the backend cannot tell."),
]

IOCTLS = [
    Panel("Resolving ioctls/s by type", "timeseries", "ops",
          (_q(f'sum by (ioctl) (rate(uffdtrace_ioctls_total{{ioctl=~"{RESOLVING}", errno="0"}}[{RATE}]))',
              "{{ioctl}}"),),
          "Successful CONTINUE, COPY, ZEROPAGE, MOVE, POISON and WAKE per second."),
    Panel("Ioctl errors/s by ioctl and errno", "timeseries", "ops",
          (_q(f'sum by (ioctl, errno) (rate(uffdtrace_ioctls_total{{errno!="0"}}[{RATE}]))',
              "{{ioctl}} {{errno}}"),),
          "Failed uffd ioctls, e.g. CONTINUE on a page already mapped (EEXIST)."),
    Panel("Ioctl latency p50 / p99 by ioctl", "timeseries", "s",
          _quantiles("uffdtrace_ioctl_seconds", "ioctl", "{{ioctl}}"),
          "Time inside each kind of uffd ioctl."),
    Panel("uffd events/s", "timeseries", "ops",
          (_q(f"sum by (event) (rate(uffdtrace_uffd_events_total[{RATE}]))", "{{event}}"),),
          "Non-fault events delivered to the handlers: fork, remap, remove, unmap."),
]

NOW = [
    Panel("Faults blocked now", "stat", "short",
          (_q("sum(uffdtrace_faults_blocked)", "blocked"),),
          "Faulting threads waiting for their page at the last scrape.", width=6, height=5),
    Panel("Oldest blocked fault", "stat", "s",
          (_q("max(uffdtrace_oldest_blocked_fault_age_seconds)", "age"),),
          "Age of the oldest fault still blocked: a stuck handler shows here.", width=6, height=5,
          red_from=1.0),
    Panel("Traced processes", "stat", "short",
          (_q("sum(uffdtrace_traced_processes)", "processes"),), width=4, height=5),
    Panel("Series dropped", "stat", "short",
          (_q("sum(uffdtrace_series_dropped_total)", "dropped"),),
          "Label sets refused past the exporter's series bound: choose fewer --labels.",
          width=4, height=5, red_from=1),
    Panel("Tracer start-up", "stat", "s",
          (_q("max(uffdtrace_startup_seconds)", "start-up"),),
          "Time from uffdtrace's start until it traced (BPF compiled and attached).", width=4,
          height=5),
]

TRACER = [
    Panel("Lost events/s by reason", "timeseries", "ops",
          (_q(f"sum by (reason) (rate(uffdtrace_lost_events_total[{RATE}]))", "{{reason}}"),),
          "Records the tracer could not deliver: anything here makes the other panels incomplete.",
          width=8),
    Panel("BPF run time by program", "timeseries", "percentunit",
          (_q(f"sum by (program) (rate(uffdtrace_bpf_run_seconds_total[{RATE}]))", "{{program}}"),
           _q(f"sum(rate(uffdtrace_bpf_run_seconds_total[{RATE}]))", "all programs")),
          "CPU time the kernel spent in uffdtrace's BPF programs, per second (100 % = one CPU).",
          width=8),
    Panel("BPF mean run time by program", "timeseries", "s",
          (_q(f"sum by (program) (rate(uffdtrace_bpf_run_seconds_total[{RATE}])) / "
              f"sum by (program) (rate(uffdtrace_bpf_runs_total[{RATE}]))", "{{program}}"),),
          "Time per run of each BPF program.", width=8),
    Panel("uffdtrace CPU", "timeseries", "percentunit",
          (_q(f"rate(uffdtrace_process_cpu_seconds_total[{RATE}])", "{{instance}}"),),
          "CPU of the uffdtrace process in user space (100 % = one CPU).", width=12, height=7),
    Panel("uffdtrace RSS", "timeseries", "bytes",
          (_q("uffdtrace_process_resident_memory_bytes", "{{instance}}"),),
          "Resident memory of the uffdtrace process.", width=12, height=7),
]

SECTIONS: list[tuple[str, list[Panel]]] = [
    ("Faults", FAULTS),
    ("Blocked now", NOW),
    ("Resolving ioctls", IOCTLS),
    ("Tracer health and cost", TRACER),
]
PANELS: list[Panel] = [p for _, panels in SECTIONS for p in panels]


def panel_queries(rate_interval: str = "5s") -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query, with `$__rate_interval` replaced."""
    return [(p.title, q.expr.replace(RATE, f"{rate_interval}")) for p in PANELS for q in p.queries]


# --- Grafana JSON ----------------------------------------------------------------------------

def _targets(panel: Panel) -> list[dict]:
    heatmap = panel.type == "heatmap"
    return [{"datasource": DATASOURCE, "editorMode": "code", "expr": q.expr,
             "format": "heatmap" if heatmap else "time_series", "instant": False,
             "legendFormat": q.legend, "range": True, "refId": chr(ord("A") + i)}
            for i, q in enumerate(panel.queries)]


def _thresholds(red_from: float | None) -> dict:
    steps: list[dict] = [{"color": "green", "value": None}]
    if red_from is not None:
        steps.append({"color": "red", "value": red_from})
    return {"mode": "absolute", "steps": steps}


def _options(panel: Panel) -> tuple[dict, dict]:
    """(fieldConfig, options) of a panel of `panel.type`."""
    defaults: dict = {"unit": panel.unit, "thresholds": _thresholds(panel.red_from)}
    if panel.type == "heatmap":
        return {"defaults": {}, "overrides": []}, {
            "calculate": False,
            "cellGap": 1,
            "color": {"exponent": 0.5, "fill": "dark-orange", "mode": "scheme", "reverse": False,
                      "scale": "exponential", "scheme": "Oranges", "steps": 64},
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
            "filterValues": {"le": 1e-9},
            "legend": {"show": True},
            "rowsFrame": {"layout": "auto"},
            "showValue": "never",
            "tooltip": {"mode": "single", "showColorScale": False, "yHistogram": True},
            "yAxis": {"axisPlacement": "left", "reverse": False, "unit": panel.unit},
        }
    if panel.type == "stat":
        defaults["color"] = {"mode": "thresholds"}
        return {"defaults": defaults, "overrides": []}, {
            "colorMode": "value", "graphMode": "area", "justifyMode": "auto",
            "orientation": "auto", "textMode": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        }
    if panel.type == "timeseries":
        defaults["color"] = {"mode": "palette-classic"}
        defaults["custom"] = {"drawStyle": "line", "fillOpacity": 0, "lineWidth": 1,
                              "showPoints": "never", "spanNulls": False}
        defaults["min"] = 0
        return {"defaults": defaults, "overrides": []}, {
            "legend": {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    raise ValueError(f"panel {panel.title!r}: unknown type {panel.type!r}")


def layout() -> list[tuple[str | Panel, dict]]:
    """Each section row and panel with its gridPos: panels flow left to right, wrapping at 24
    columns; a grid row is as high as its highest panel."""
    placed: list[tuple[str | Panel, dict]] = []
    y = 0
    for name, panels in SECTIONS:
        placed.append((name, {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}))
        y += 1
        x, row_h = 0, 0
        for p in panels:
            if x + p.width > GRID_WIDTH:
                x, y, row_h = 0, y + row_h, 0
            placed.append((p, {"h": p.height, "w": p.width, "x": x, "y": y}))
            x += p.width
            row_h = max(row_h, p.height)
        y += row_h
    return placed


def dashboard_json() -> dict:
    """The Grafana dashboard (import it, then pick the Prometheus data source)."""
    panels = []
    for pid, (item, grid) in enumerate(layout(), start=1):
        if isinstance(item, str):
            panels.append({"collapsed": False, "gridPos": grid, "id": pid, "panels": [],
                           "title": item, "type": "row"})
            continue
        field_config, options = _options(item)
        panels.append({"datasource": DATASOURCE, "description": item.description,
                       "fieldConfig": field_config, "gridPos": grid, "id": pid, "options": options,
                       "targets": _targets(item), "title": item.title, "type": item.type})
    return {
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
            "type": "dashboard"}]},
        "description": "userfaultfd faults traced with eBPF by `uffdtrace export`",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": panels,
        "refresh": "10s",
        "schemaVersion": 39,
        "tags": ["uffdtrace", "userfaultfd", "ebpf"],
        "templating": {"list": [{
            "current": {}, "hide": 0, "includeAll": False, "label": "Data source", "multi": False,
            "name": "datasource", "options": [], "query": "prometheus", "refresh": 1, "regex": "",
            "skipUrlSync": False, "type": "datasource"}]},
        "time": {"from": "now-15m", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "uffdtrace",
        "uid": "uffdtrace",
        "version": 1,
        "weekStart": "",
    }


def render() -> str:
    """The dashboard as the text of docs/grafana/uffdtrace-dashboard.json."""
    return json.dumps(dashboard_json(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
