"""`uffdtrace export` scraped by a real Prometheus (Debian's, tests/prometheus.py): exact fault
counts against the workload's ground truth, quantiles against a `record` CSV of the same
faults, every Grafana panel's query, an exporter restarted mid-run, and a flood of 20,000
short-lived processes against the series bound (issue #14).

The workloads run under names of their own (a symlink to the uffdtrace script; a copy of the
flood program), and the exporter keeps only those (--comm), so nothing else on the machine is
counted.
"""

from __future__ import annotations

import errno
import json
import math
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import build_c, read_stderr_until, reaped
from tests.prometheus import Prometheus, free_port
from uffdtrace.dashboard import panel_queries

pytestmark = [pytest.mark.root, pytest.mark.hugepages]

UFFDTRACE = [sys.executable, "-m", "uffdtrace"]
SCRIPT = Path(sys.executable).parent / "uffdtrace"
WORKLOAD = "uffdx-exported"  # the exerciser's process name here
FLOOD = "uffdx-flood"


@pytest.fixture(scope="module")
def named_exerciser(tmp_path_factory) -> Path:
    """The uffdtrace script under another name: its processes' comm is WORKLOAD."""
    link = tmp_path_factory.mktemp("bin") / WORKLOAD
    link.symlink_to(SCRIPT)
    return link


@pytest.fixture(scope="module")
def flood(tmp_path_factory) -> Path:
    return build_c(tmp_path_factory, "flood.c", FLOOD)


@contextmanager
def exporter(port: int, *args: str) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen([*UFFDTRACE, "export", "--listen", f"127.0.0.1:{port}", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with reaped(proc):
        read_stderr_until(proc, "exporting")
        yield proc


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return err


def value(prom: Prometheus, expr: str) -> float:
    result = prom.query(expr)
    assert len(result) == 1, (expr, result)
    return result[0][1]


def wait_value(prom: Prometheus, expr: str, expected: float, timeout_s: float = 20.0) -> None:
    prom.wait_until(expr, lambda r: len(r) == 1 and r[0][1] == expected, timeout_s=timeout_s)


def recorded_exercise(tmp: Path, exerciser: Path, name: str, args: list[str]) -> tuple[pd.DataFrame, dict]:
    """`record` of one exerciser run (rows, ground-truth summary); the exporter sees it too."""
    gt, csv = tmp / f"{name}.json", tmp / f"{name}.csv"
    ops = tmp / f"{name}-ops.csv"
    workload = shlex.join([str(exerciser), "exercise", *args, "--ops-csv", str(ops), "--json"])
    out = subprocess.run([*UFFDTRACE, "record", "-o", str(csv), "--json", "--",
                          "sh", "-c", f"{workload} > {gt}"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["command_exit"] == 0, out.stderr
    truth = json.loads(gt.read_text())
    truth["ops"] = pd.read_csv(ops)
    return pd.read_csv(csv), truth


def log2_bucket(seconds: float) -> int:
    """The log2 µs bucket of a duration: N for [2^N, 2^(N+1)) µs (0 also below 1 µs)."""
    us = seconds * 1e6
    return max(0, math.floor(math.log2(us))) if us >= 1 else 0


def test_prometheus_counts_every_fault(tmp_path, named_exerciser, flood):
    """Three workloads (shmem minor with every CONTINUE twice, hugetlb minor, anonymous missing
    with a handler process) and a few short-lived processes with REMOVE events: Prometheus' sum
    of uffdtrace_faults_total is their fault count exactly, its ioctl counters are the
    exerciser's own, the stall p50 and p99 are those of `record`'s CSV of the same faults
    within one log2 bucket, nothing is lost, and every Grafana panel's query returns data."""
    port = free_port()
    with Prometheus([f"127.0.0.1:{port}"]) as prom, exporter(
            port, "--comm", f"^({WORKLOAD}|{FLOOD})$", "--labels", "comm,pid,backing,kind"):
        prom.wait_targets_up(timeout_s=30)
        runs = [
            recorded_exercise(tmp_path, named_exerciser, "shmem", [
                "--backing", "shmem", "--pages", "20000", "--threads", "2", "--continue-twice"]),
            recorded_exercise(tmp_path, named_exerciser, "hugetlb", [
                "--backing", "hugetlb", "--pages", "64", "--threads", "2"]),
            recorded_exercise(tmp_path, named_exerciser, "anon", [
                "--backing", "anon", "--kind", "missing", "--pages", "5000", "--handler", "process"]),
        ]
        subprocess.run([str(flood), "20"], check=True, timeout=60)
        faults = sum(truth["faults"] for _, truth in runs)
        ops = pd.concat([truth["ops"] for _, truth in runs])
        wait_value(prom, f'sum(uffdtrace_faults_total{{comm="{WORKLOAD}"}})', faults)
        wait_value(prom, f'sum(uffdtrace_faults_total{{comm="{FLOOD}"}})', 20)
        by_backing = {labels["backing"]: v for labels, v in prom.query(
            f'sum by (backing) (uffdtrace_faults_total{{comm="{WORKLOAD}"}})')}
        assert by_backing == {run[1]["backing"]: run[1]["faults"] for run in runs}
        for (op, err), n in ops.groupby(["op", "errno"]).size().items():
            name = errno.errorcode[err] if err else "0"
            # (a handler process is traced under its own name)
            assert value(prom, f'sum(uffdtrace_ioctls_total{{comm!="{FLOOD}",ioctl="{op}",'
                               f'errno="{name}"}})') == n, (op, err)
        assert value(prom, f'sum(uffdtrace_uffd_events_total{{comm="{FLOOD}",event="remove"}})') == 20
        assert value(prom, "sum(uffdtrace_lost_events_total)") == 0
        assert value(prom, "sum(uffdtrace_faults_blocked)") == 0

        # the same faults have a stall in both (a fault mapped before its thread slept has none)
        stalls = pd.concat([rows for rows, _ in runs])["stall_ns"].dropna().to_numpy() * 1e-9
        assert value(prom, f'sum(uffdtrace_fault_stall_seconds_count{{comm="{WORKLOAD}"}})') == len(stalls)
        for q in (0.5, 0.99):
            theirs = value(prom, f'histogram_quantile({q}, sum by (le) '
                                 f'(uffdtrace_fault_stall_seconds_bucket{{comm="{WORKLOAD}"}}))')
            ours = float(np.quantile(stalls, q))
            assert abs(log2_bucket(theirs * (1 - 1e-9)) - log2_bucket(ours)) <= 1, (q, theirs, ours)

        time.sleep(3)  # rate() needs two scrapes of every series in its window
        empty = [(title, q) for title, q in panel_queries("10s") if not prom.query(q)]
        assert not empty, f"panels whose query returned no data: {empty}"


def test_restarted_exporter(named_exerciser):
    """The exporter stopped and started again between two workloads: its counter restarts from
    zero (each run's count exactly, scraped before it stops); Prometheus sees exactly one reset
    and rate() stays >= 0 across it."""
    port = free_port()
    args = ["--backing", "shmem", "--pages", "4000", "--fetch-delay-us", "500", "--json"]
    series = f'sum(uffdtrace_faults_total{{comm="{WORKLOAD}"}})'
    with Prometheus([f"127.0.0.1:{port}"]) as prom:
        counted, start = [], time.time()
        for _ in range(2):
            with exporter(port, "--comm", f"^{WORKLOAD}$") as proc:
                prom.wait_targets_up(timeout_s=30)
                out = subprocess.run([str(named_exerciser), "exercise", *args], check=True,
                                     capture_output=True, text=True, timeout=120)
                counted.append(json.loads(out.stdout)["faults"])
                wait_value(prom, series, counted[-1])
                stop(proc)
        window = f"{math.ceil(time.time() - start) + 5}s"
        assert value(prom, f'sum(resets(uffdtrace_faults_total{{comm="{WORKLOAD}"}}[{window}]))') == 1
        assert value(prom, f'min_over_time(min(rate(uffdtrace_faults_total{{comm="{WORKLOAD}"}}[3s]))'
                           f'[{window}:1s])') >= 0


def test_flood_of_short_lived_processes(flood):
    """20,000 processes, each with one fault and then gone, labelled by pid: every fault is
    counted, the series stay within --max-series (the rest under pid "other"), the refused
    label sets are counted, and the exporter forgets the processes (traced_processes drops)."""
    port, bound = free_port(), 100
    with Prometheus([f"127.0.0.1:{port}"]) as prom, exporter(
            port, "--comm", f"^{FLOOD}$", "--labels", "comm,pid", "--max-series", str(bound)):
        prom.wait_targets_up(timeout_s=30)
        subprocess.run([str(flood), "20000"], check=True, timeout=600)
        wait_value(prom, "sum(uffdtrace_faults_total)", 20000, timeout_s=30)  # comm "other" past the bound
        counted = 'count({__name__=~"uffdtrace_(faults|ioctls)_total"%s})'
        overflow = value(prom, counted % ',pid="other"')  # one per (backing, kind) or (ioctl, errno)
        assert value(prom, counted % "") <= bound + overflow and overflow <= 3
        assert value(prom, 'sum(uffdtrace_faults_total{pid="other"})') > 19000
        assert value(prom, "sum(uffdtrace_series_dropped_total)") > 0
        assert value(prom, "sum(uffdtrace_lost_events_total)") == 0
        wait_value(prom, "sum(uffdtrace_traced_processes)", 0)
