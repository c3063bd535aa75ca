"""Emulate a post-copy live migration on this machine, with userfaultfd MINOR faults.

A source namespace and a target namespace are joined by a veth pair shaped by a TBF qdisc
(bandwidth). The source's vCPU threads keep dirtying guest memory while precopy rounds copy
it over TCP; at switch-over the source pauses (downtime), the target's vCPUs start on the
MINOR-registered mapping, its demand handler fetches stale pages on their first touch
(fresh ones are CONTINUEd at once) and a prefetcher maps the stale pages the source pushes.
At the end the target's memory is compared with the source's byte for byte.

This kernel has no netem: --delay-us is a one-way delay added in user space. Each message
carries its send time and the receiver holds it until send time + delay, so requests and
replies (demand fetches) see it in full, while a saturated bulk stream, already queued
longer than that in the socket buffers, hardly does.

Everything created (namespaces uffdm-PID-N-src/dst, veth umPIDxNs/t) is removed on exit,
Ctrl-C, SIGTERM and errors; leftovers of a killed run are removed by the next one.

examples:
  uffdtrace migrate --size 128 --bandwidth 10 --dirty-rate 50000
  uffdtrace migrate --rounds 0 --no-prefetch --json        pure post-copy, demand faults only
  uffdtrace migrate --size 256 --bandwidth 1 10 --prefetch both --delay-us 100
                                                           prefetch on/off at two bandwidths
  uffdtrace record -o faults.csv -- uffdtrace migrate --json-out migration.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from uffdtrace.errors import UserError
from uffdtrace.migration import MigrationConfig
from uffdtrace.migration import run as run_migration
from uffdtrace.migration.scenario import BACKINGS, PATTERNS

TABLE = [  # (header, summary key, scale, format)
    ("Gbit/s", "bandwidth", 1, "{:g}"),
    ("prefetch", "prefetch", 1, "{}"),
    ("rounds", "rounds", 1, "{}"),
    ("stale", "stale_pages", 1, "{}"),
    ("downtime ms", "downtime_ns", 1e-6, "{:.2f}"),
    ("post-copy ms", "postcopy_ns", 1e-6, "{:.1f}"),
    ("faults", "demand_faults", 1, "{}"),
    ("demand", "demand_fetched", 1, "{}"),
    ("prefetched", "prefetched_pages", 1, "{}"),
    ("waited", "prefetch_waits", 1, "{}"),
    ("blocktime ms", "blocktime_ns", 1e-6, "{:.1f}"),
    ("equal", "memory_equal", 1, "{}"),
    ("target pid", "target_pid", 1, "{}"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = MigrationConfig()
    p.add_argument("--size", type=int, default=d.size_mib, metavar="MiB",
                   help=f"guest memory (default {d.size_mib})")
    p.add_argument("--backing", choices=BACKINGS, default=d.backing,
                   help="shmem (4 KiB pages) or hugetlb (2 MiB pages)")
    p.add_argument("--vcpus", type=int, default=d.vcpus, help=f"vCPU threads (default {d.vcpus})")
    p.add_argument("--dirty-rate", type=float, default=d.dirty_rate, metavar="PAGES/S",
                   help=f"pages written per second on the source (default {d.dirty_rate:g})")
    p.add_argument("--pattern", choices=PATTERNS, default=d.pattern,
                   help="dirtying and first-touch order; hot = 10 %% of pages (default random)")
    p.add_argument("--bandwidth", type=float, nargs="+", default=[d.bandwidth_gbit],
                   metavar="GBIT/S", help="link rate(s) (TBF); several values: one run each")
    p.add_argument("--delay-us", type=float, default=d.delay_us,
                   help="one-way delay, added in user space (default 0)")
    p.add_argument("--mtu", type=int, default=d.mtu, help=f"veth MTU (default {d.mtu})")
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help=f"precopy rounds at most; 0 = pure post-copy (default {d.rounds})")
    p.add_argument("--converge", type=float, default=d.converge, metavar="FRACTION",
                   help=f"switch over once at most this fraction is dirty (default {d.converge})")
    p.add_argument("--prefetch", choices=("on", "off", "both"), default="on",
                   help="background prefetch of stale pages; both = one run each (default on)")
    p.add_argument("--no-prefetch", dest="prefetch", action="store_const", const="off",
                   help="same as --prefetch off")
    p.add_argument("--seed", type=int, default=d.seed, help="dirtying and touch order seed")
    p.add_argument("--stall-timeout", type=float, default=d.stall_timeout_s, metavar="S",
                   help="give up when no vCPU progresses for S seconds")
    p.add_argument("-j", "--json", action="store_true", help="summary as JSON on stdout")
    p.add_argument("--json-out", metavar="FILE", help="also write the JSON summary to FILE")


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise UserError("migrate needs root (network namespaces, hugepages): run it as root")
    prefetch = {"on": [True], "off": [False], "both": [True, False]}[args.prefetch]
    configs = [MigrationConfig(
        size_mib=args.size, backing=args.backing, vcpus=args.vcpus, dirty_rate=args.dirty_rate,
        pattern=args.pattern, bandwidth_gbit=bw, delay_us=args.delay_us, mtu=args.mtu,
        rounds=args.rounds, converge=args.converge, prefetch=pf, seed=args.seed,
        stall_timeout_s=args.stall_timeout).validated() for bw in args.bandwidth for pf in prefetch]
    out = None
    if args.json_out:
        try:
            out = open(args.json_out, "w")  # noqa: SIM115 - kept open across the runs
        except OSError as e:
            raise UserError(f"cannot write {args.json_out}: {e.strerror}") from e
    summaries = []
    try:
        for cfg in configs:
            summaries.append(run_migration(cfg))
            if not args.json and len(configs) == 1:
                print_summary(summaries[-1], sys.stderr)
        result: Any = summaries[0] if len(summaries) == 1 else summaries
        if out:
            json.dump(result, out, indent=2)
        if args.json:
            json.dump(result, sys.stdout, indent=2)
            print()
        elif len(summaries) > 1:
            print_table(summaries, sys.stderr)
    finally:
        if out:
            out.close()
    return 0 if all(s["memory_equal"] for s in summaries) else 1


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.2f} ms"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def print_summary(s: dict[str, Any], out) -> None:
    c = s["config"]
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"migration: {c['size_mib']} MiB {c['backing']} ({s['pages']} pages of "
      f"{s['page_size'] >> 10} KiB), {c['vcpus']} vCPUs dirtying {c['dirty_rate']:g} pages/s "
      f"({c['pattern']}), {c['bandwidth_gbit']:g} Gbit/s, delay {c['delay_us']:g} µs, "
      f"prefetch {'on' if c['prefetch'] else 'off'}")
    p(f"  precopy      {s['rounds']} rounds in {_ms(s['precopy_ns'])}, pages sent per round "
      f"{' '.join(map(str, s['round_pages'])) or '-'}, {s['precopy_gbit_s']:.2f} Gbit/s")
    p(f"  switch-over  {s['stale_pages']} stale pages ({100 * s['stale_fraction']:.1f} %), "
      f"downtime {_ms(s['downtime_ns'])}")
    p(f"  post-copy    {_ms(s['postcopy_ns'])}: {s['demand_faults']} demand faults = "
      f"{s['already_fresh']} already fresh + {s['demand_fetched']} demand-fetched + "
      f"{s['prefetch_waits']} resolved by the prefetcher; {s['prefetched_pages']} pages "
      f"prefetched ({s['prefetch_discarded']} pushed pages discarded)")
    if s["demand_fetched"]:
        p(f"  demand fetch mean {_ms(s['demand_fetch_mean_ns'])}, "
          f"max {_ms(s['demand_fetch_max_ns'])}")
    p(f"  blocktime    total {_ms(s['blocktime_ns'])}; " + ", ".join(
        f"vCPU {v['vcpu']} {_ms(v['blocktime_ns'])} (max {_ms(v['max_stall_ns'])})"
        for v in s["vcpu_blocktime"]))
    b = s["bytes_sent"]
    p(f"  bytes sent   precopy {_mb(b['precopy'])}, switch-over {_mb(b['switch_over'])}, "
      f"demand {_mb(b['demand'])}, prefetch {_mb(b['prefetch'])}")
    p(f"  total        {_ms(s['total_ns'])}; memory: " + (
        "target equals source" if s["memory_equal"]
        else f"{s['mismatched_pages']} pages DIFFER from the source"))
    if s["removed_leftovers"]:
        p(f"  removed leftovers of a killed run: {', '.join(s['removed_leftovers'])}")


def print_table(summaries: list[dict[str, Any]], out) -> None:
    rows = [[h for h, *_ in TABLE]]
    for s in summaries:
        values = {**s, "bandwidth": s["config"]["bandwidth_gbit"],
                  "prefetch": "on" if s["config"]["prefetch"] else "off"}
        rows.append([fmt.format(values[key] * scale if scale != 1 else values[key])
                     for _, key, scale, fmt in TABLE])
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE))]
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)), file=out)
