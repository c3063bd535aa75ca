"""The Prometheus harness (tests/prometheus.py) against a real /usr/bin/prometheus scraping a
prometheus_client exporter in this process, with the metric names and bucket bounds of
`uffdtrace export`; and docs/render_dashboard.py drawing the dashboard from that Prometheus."""

from __future__ import annotations

import math
import os
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from docs.render_dashboard import render, scrape_interval
from tests.prometheus import Prometheus, PrometheusError, free_port

# `uffdtrace export`'s histogram buckets: powers of two of 1 µs, from 2 µs to 2^25 µs, then +Inf
BUCKETS = [2**k * 1e-6 for k in range(1, 26)]
LABELS = {"comm": "x", "backing": "shmem", "kind": "minor"}
FAST, SLOW = (600, 100e-6), (400, 5e-3)  # (faults, stall s): 100 µs in (64, 128] µs, 5 ms in (4.1, 8.2] ms


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Exporter:
    port: int
    faults: Counter
    stall: Histogram


@pytest.fixture(scope="module")
def exporter() -> Iterator[Exporter]:
    """prometheus_client's WSGI app on its own registry, served from a thread."""
    registry = CollectorRegistry()
    faults = Counter("uffdtrace_faults", "faults", list(LABELS), registry=registry)
    stall = Histogram("uffdtrace_fault_stall_seconds", "stall", list(LABELS), buckets=BUCKETS,
                      registry=registry)
    Gauge("uffdtrace_faults_blocked", "blocked now", registry=registry).set(3)
    faults.labels(**LABELS)  # the series exist at 0 from the first scrape on, for rate()
    stall.labels(**LABELS)
    server = make_server("127.0.0.1", free_port(), make_wsgi_app(registry), _Server, _Quiet)
    thread = threading.Thread(target=server.serve_forever, name="exporter", daemon=True)
    thread.start()
    try:
        yield Exporter(server.server_port, faults, stall)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def prom(exporter: Exporter) -> Iterator[Prometheus]:
    """Prometheus scraping the exporter, which counted FAST and SLOW faults after its first
    scrape (so that rate() sees them)."""
    with Prometheus([f"127.0.0.1:{exporter.port}"]) as p:
        p.wait_targets_up(timeout_s=10)
        for n, stall in (FAST, SLOW):
            for _ in range(n):
                exporter.faults.labels(**LABELS).inc()
                exporter.stall.labels(**LABELS).observe(stall)
        yield p


def test_counts_and_quantiles_through_prometheus(prom: Prometheus, exporter: Exporter):
    faults = FAST[0] + SLOW[0]
    [(_, total)] = prom.wait_until("sum(uffdtrace_faults_total)", lambda r: r and r[0][1] == faults, 5)
    assert total == faults
    # rate over a window that holds the scrape before the faults and one after
    quantile = "histogram_quantile({q}, sum by (le) (rate(uffdtrace_fault_stall_seconds_bucket[10s])))"
    [(_, p50)] = prom.wait_until(quantile.format(q=0.5), lambda r: r and math.isfinite(r[0][1]), 5)
    [(_, p99)] = prom.query(quantile.format(q=0.99))
    # within its bucket, Prometheus interpolates linearly: rank 500 of 600 in (64, 128] µs,
    # rank 990 - 600 = 390 of 400 in (4096, 8192] µs
    assert 64e-6 < p50 <= 128e-6 and p50 == pytest.approx(64e-6 + 64e-6 * 500 / 600, rel=1e-9)
    assert 4096e-6 < p99 <= 8192e-6 and p99 == pytest.approx(4096e-6 + 4096e-6 * 390 / 400, rel=1e-9)
    [(_, count)] = prom.query("sum(uffdtrace_fault_stall_seconds_count)")
    [(_, seconds)] = prom.query("sum(uffdtrace_fault_stall_seconds_sum)")
    assert count == faults
    assert seconds == pytest.approx(FAST[0] * FAST[1] + SLOW[0] * SLOW[1], rel=1e-9)
    # the buckets, as scraped: le at each bound, labels kept
    buckets = prom.query("uffdtrace_fault_stall_seconds_bucket")
    assert {float(labels["le"]) for labels, _ in buckets} == {*BUCKETS, math.inf}
    assert all({k: labels[k] for k in LABELS} == LABELS for labels, _ in buckets)
    [(labels, up)] = prom.query("up")
    assert up == 1 and labels["instance"] == f"127.0.0.1:{exporter.port}" and labels["job"] == "uffdtrace"
    assert prom.targets_up() == {f"127.0.0.1:{exporter.port}": True}
    # a range query sees the counter go from 0 to its total (its last point at `end`, which
    # follows the scrape the instant queries saw)
    end = time.time()
    start = end - 0.5 * int((end - prom.started) / 0.5)
    [(_, points)] = prom.query_range("sum(uffdtrace_faults_total)", start, end, 0.5)
    assert points[0][1] == 0 and points[-1] == (pytest.approx(end, abs=1e-3), faults)
    with pytest.raises(PrometheusError, match="parse error"):
        prom.query("sum(")


def test_dashboard_rendered_from_prometheus(prom: Prometheus, tmp_path: Path):
    prom.wait_until("sum(uffdtrace_faults_total)", lambda r: r and r[0][1] == FAST[0] + SLOW[0], 5)
    assert scrape_interval(prom.url) == 1.0
    out = tmp_path / "dashboard.png"
    # every panel's PromQL runs (Prometheus refusing one raises); the exported ones have data
    had_data = render(prom.url, prom.started - 5, time.time() + 1, out, step=0.5)
    assert had_data["Fault stall (heatmap)"] and had_data["Faults/s by backing and kind"]
    assert had_data["Stall p50 / p99 by process"] and had_data["Faults blocked now"]
    assert not had_data["Ioctl errors/s by ioctl and errno"]  # not exported here
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 50_000


def test_prometheus_fails_loudly_and_leaves_nothing(tmp_path: Path):
    with pytest.raises(PrometheusError, match="is missing"):
        Prometheus(["127.0.0.1:1"], binary=tmp_path / "no-prometheus").__enter__()
    # a configuration Prometheus refuses: its own error is in the message
    refused = Prometheus(["127.0.0.1:1"], scrape_timeout="5s")
    with pytest.raises(PrometheusError, match=r"(?s)exited with status .*scrape timeout greater than"):
        refused.__enter__()
    assert refused.proc is None and refused._tmp is None  # waited for, storage removed
    with Prometheus(["127.0.0.1:1"]) as p:
        proc, storage = p.proc, Path(p._tmp.name)
        assert storage.is_dir()
    assert proc.poll() is not None and not storage.exists()
    assert not os.path.exists(f"/proc/{proc.pid}/status") or "State:\tZ" not in Path(
        f"/proc/{proc.pid}/status").read_text()
