"""The Grafana dashboard: the committed JSON is the generator's output, and it is well formed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from uffdtrace import dashboard

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "uffdtrace-dashboard.json"


def test_committed_file_is_the_generators_output():
    out = subprocess.run([sys.executable, "-m", "uffdtrace.dashboard"], capture_output=True, text=True,
                         check=True).stdout
    assert out == dashboard.render()
    assert COMMITTED.read_text() == out, (
        "docs/grafana/uffdtrace-dashboard.json is stale: regenerate it with "
        "`python -m uffdtrace.dashboard > docs/grafana/uffdtrace-dashboard.json`")


def test_dashboard_header():
    d = json.loads(COMMITTED.read_text())
    assert d["uid"] == "uffdtrace"
    assert d["schemaVersion"] == 39
    [var] = d["templating"]["list"]
    assert (var["name"], var["type"], var["query"]) == ("datasource", "datasource", "prometheus")


def test_every_panel_has_queries_and_a_valid_place():
    d = dashboard.dashboard_json()
    panels = d["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    taken: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert set(g) == {"h", "w", "x", "y"} and all(isinstance(v, int) for v in g.values()), p["title"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] >= 1 and g["h"] >= 1, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{p['title']} overlaps another panel"
        taken |= cells
        if p["type"] == "row":
            continue
        assert p["type"] in {"heatmap", "timeseries", "stat"}, p["title"]
        assert p["targets"], f"{p['title']} has no query"
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}", p["title"]
            assert t["format"] == ("heatmap" if p["type"] == "heatmap" else "time_series")
        assert p["datasource"]["uid"] == "${datasource}"
    # no gap: the panels tile the grid down to the last one
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    assert len(taken) == 24 * bottom


def test_panel_queries_substitute_the_rate_interval():
    queries = dashboard.panel_queries("7s")
    assert len(queries) == sum(len(p.queries) for p in dashboard.PANELS)
    assert {t for t, _ in queries} == {p.title for p in dashboard.PANELS}
    for title, expr in queries:
        assert "$" not in expr, title
        # every range selector uses the given interval
        assert set(re.findall(r"\[([^\]]+)\]", expr)) <= {"7s"}, title
    heatmap = [e for t, e in queries if t.startswith("Fault stall")]
    assert heatmap == ["sum by (le) (rate(uffdtrace_fault_stall_seconds_bucket[7s]))"]


def test_the_issues_panels_are_there():
    exprs = " ".join(e for _, e in dashboard.panel_queries())
    for metric in ["uffdtrace_fault_stall_seconds_bucket", "uffdtrace_faults_total",
                   "uffdtrace_ioctls_total", "uffdtrace_ioctl_seconds_bucket",
                   "uffdtrace_faults_blocked", "uffdtrace_oldest_blocked_fault_age_seconds",
                   "uffdtrace_lost_events_total", "uffdtrace_bpf_run_seconds_total",
                   "uffdtrace_process_cpu_seconds_total", "uffdtrace_process_resident_memory_bytes",
                   "uffdtrace_traced_processes", "uffdtrace_series_dropped_total"]:
        assert metric in exprs, metric
    assert 'errno!="0"' in exprs
    assert {p.type for p in dashboard.PANELS} == {"heatmap", "timeseries", "stat"}
