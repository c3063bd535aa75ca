"""Post-copy migration emulator, on the real kernel: link, content, races, bandwidth, tracer."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from pyroute2 import IPRoute, netns

from uffdtrace.errors import UserError
from uffdtrace.migration import Link, MigrationConfig, measure_bandwidth, remove_leftovers, run
from uffdtrace.migration.link import leftovers

pytestmark = [pytest.mark.root, pytest.mark.netns]

UFFDTRACE = [sys.executable, "-m", "uffdtrace"]
NODE = "uffdtrace.migration.node"


def ours(pid: int) -> list[str]:
    """Namespaces and root-namespace links created by process `pid`."""
    with IPRoute() as ip:
        links = [link.get_attr("IFLA_IFNAME") for link in ip.get_links()]
    return [n for n in netns.listnetns() + links
            if re.match(rf"^(uffdm-{pid}-|um{pid}x)", n)]


def node_processes() -> set[int]:
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if NODE in proc.joinpath("cmdline").read_text():
                found.add(int(proc.name))
        except OSError:
            continue
    return found


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def check_counts(s: dict) -> None:
    """Every fault message and every stale page is accounted for exactly once."""
    assert s["memory_equal"] and s["mismatched_pages"] == 0
    assert s["demand_faults"] == s["already_fresh"] + s["demand_fetched"] + s["prefetch_waits"]
    assert s["demand_fetched"] + s["prefetched_pages"] == s["stale_pages"]
    assert s["handler_continues"] + s["eexist"] == s["already_fresh"] + s["demand_fetched"]
    assert s["downtime_ns"] > 0 and s["postcopy_ns"] > 0


def test_link_set_up_and_torn_down(no_leaks):
    with Link(rate_bps=2e9, mtu=9000) as link:
        assert {link.source_ns, link.target_ns} <= set(netns.listnetns())
        with IPRoute(netns=link.target_ns) as ip:
            index = ip.link_lookup(ifname=link.target_if)[0]
            assert ip.get_links(index)[0].get_attr("IFLA_MTU") == 9000
            assert [q.get_attr("TCA_KIND") for q in ip.get_qdiscs(index)] == ["tbf"]
    assert ours(os.getpid()) == []


def test_bandwidth_honoured_within_10_percent(no_leaks):
    with Link(rate_bps=1e9) as link:
        achieved = measure_bandwidth(link, 48 << 20)
    assert abs(achieved - 1e9) / 1e9 < 0.10, achieved


def test_content_equal_while_source_dirties(no_leaks):
    s = run(MigrationConfig(size_mib=32, dirty_rate=30000, rounds=3, vcpus=2))
    check_counts(s)
    assert 0 < s["stale_pages"] < s["pages"]
    assert s["rounds"] >= 1 and s["round_pages"][0] == s["pages"]
    assert s["bytes_sent"]["precopy"] >= s["pages"] * s["page_size"]
    assert len(s["vcpu_blocktime"]) == 2 and s["blocktime_ns"] > 0


def test_stale_fraction_zero(no_leaks):
    s = run(MigrationConfig(size_mib=16, dirty_rate=0, rounds=2))
    check_counts(s)
    assert s["stale_pages"] == 0 and s["demand_fetched"] == 0 and s["prefetched_pages"] == 0
    assert s["demand_faults"] == s["already_fresh"] == s["pages"]
    assert s["rounds"] == 1   # nothing dirty after the first round: converged


def test_stale_fraction_full_demand_only(no_leaks):
    s = run(MigrationConfig(size_mib=16, rounds=0, prefetch=False))
    check_counts(s)
    assert s["stale_fraction"] == 1.0 and s["bytes_sent"]["precopy"] == 0
    assert s["demand_fetched"] == s["demand_faults"] == s["pages"]


def test_demand_and_prefetch_race(no_leaks):
    """All pages stale, 8 vCPUs touching in the order the source pushes: heavy contention."""
    s = run(MigrationConfig(size_mib=32, rounds=0, vcpus=8, pattern="seq", bandwidth_gbit=2))
    check_counts(s)
    assert s["demand_fetched"] > 0 and s["prefetched_pages"] > 0
    assert s["prefetch_discarded"] + s["push_skipped"] > 0   # the race happened


@pytest.mark.hugepages
def test_hugetlb(no_leaks):
    s = run(MigrationConfig(size_mib=16, backing="hugetlb", dirty_rate=100, rounds=2))
    check_counts(s)
    assert s["page_size"] == 2 << 20 and s["pages"] == 8


def test_bad_input_is_one_line():
    for args in (["--size", "0"], ["--vcpus", "100"], ["--bandwidth", "0"],
                 ["--backing", "hugetlb", "--size", "3"]):
        out = subprocess.run([*UFFDTRACE, "migrate", *args], capture_output=True, text=True)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("uffdtrace: "), out.stderr
    with pytest.raises(UserError, match="pattern"):
        MigrationConfig(pattern="zigzag").validated()


def test_not_root_is_one_line():
    """Not pyroute2's traceback from the first namespace it cannot mount."""
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    out = subprocess.run([*nobody, *UFFDTRACE, "migrate", "--size", "8"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr == "uffdtrace: migrate needs root (network namespaces, hugepages): run it as root\n"


def test_comparison_table():
    out = subprocess.run([*UFFDTRACE, "migrate", "--size", "8", "--bandwidth", "1", "2",
                          "--prefetch", "both"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].split()[:2] == ["Gbit/s", "prefetch"] and len(lines) == 5
    assert [line.split()[1] for line in lines[1:]] == ["on", "off", "on", "off"]
    header = [h.strip() for h in re.split(r"\s{2,}", lines[0].strip())]
    equal = header.index("equal")
    assert all(line.split()[equal] == "True" for line in lines[1:])


def _start_slow_migration() -> subprocess.Popen:
    proc = subprocess.Popen([*UFFDTRACE, "migrate", "--size", "64", "--rounds", "0",
                             "--no-prefetch", "--delay-us", "300"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(node_processes()) == 2 and len(ours(proc.pid)) == 2)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_cleans_up(sig):
    proc = _start_slow_migration()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert ours(proc.pid) == []
    wait_for(lambda: not node_processes())


@pytest.mark.parametrize("role", ["source", "target"])
def test_crash_of_either_side_cleans_up(role):
    proc = _start_slow_migration()

    def nodes_of_role() -> list[int]:
        found = []
        for pid in node_processes():
            with contextlib.suppress(OSError):
                if f"{NODE}\0{role}" in Path(f"/proc/{pid}/cmdline").read_text():
                    found.append(pid)
        return found

    wait_for(lambda: len(nodes_of_role()) == 1)
    os.kill(nodes_of_role()[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and err.count("\n") == 1, err
    assert "migration failed" in err or "node died" in err, err
    assert ours(proc.pid) == []
    wait_for(lambda: not node_processes())


def test_sigkill_leftovers_removed_on_next_start():
    proc = _start_slow_migration()
    proc.kill()
    proc.wait()
    wait_for(lambda: not node_processes())   # the nodes die with their parent
    names = ours(proc.pid)
    assert len(names) == 2 and set(names) <= set(leftovers())
    assert set(names) <= set(remove_leftovers())
    assert ours(proc.pid) == []


@pytest.mark.parametrize("prefetch", ["on", "off"])
def test_tracer_counts_equal_demand_faults(tmp_path, prefetch):
    csv, summary = tmp_path / "faults.csv", tmp_path / "migration.json"
    out = subprocess.run(
        [*UFFDTRACE, "record", "--json", "-o", str(csv), "--", *UFFDTRACE, "migrate",
         "--size", "16", "--rounds", "1", "--dirty-rate", "40000", "--prefetch", prefetch,
         "--json-out", str(summary)],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    recorded, s = json.loads(out.stdout), json.loads(summary.read_text())
    check_counts(s)
    assert recorded["command_exit"] == 0 and recorded["lost_total"] == 0
    faults = pd.read_csv(csv)
    target = faults[faults["pid"] == s["target_pid"]]
    assert (target["kind"] == "minor").all()
    assert set(target["tid"]) <= {v["tid"] for v in s["vcpu_blocktime"]}
    # The faults the demand handler resolved were woken by its own CONTINUE.
    by_handler = target[(target["resolver"] == "CONTINUE")
                        & (target["handler_tid"] == s["handler_tid"])]
    assert len(by_handler) == s["handler_continues"] > 0
    if prefetch == "off":   # every fault is one message read and CONTINUEd by the handler
        assert len(target) == s["demand_faults"] == s["handler_continues"]
    else:   # the prefetcher may also resolve a fault before its message is read
        by_prefetcher = target[target["handler_tid"] == s["prefetch_tid"]]
        assert s["demand_faults"] <= len(target) <= s["demand_faults"] + len(by_prefetcher)
