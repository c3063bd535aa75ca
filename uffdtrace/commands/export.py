"""Export userfaultfd fault metrics for Prometheus, from aggregates kept in BPF (--mode stats).

A daemon cheap enough to leave running on every host: BPF adds each fault and each uffd ioctl
to per-CPU log2 histograms and counters (no record per fault), and the exporter reads them once
per --interval. Prometheus scrapes http://ADDR:PORT/metrics (OpenMetrics or text, by the
scraper's Accept header). Metrics, all prefixed uffdtrace_:
  faults_total, blocked_seconds_total                  per label set (--labels)
  fault_{stall,wake_to_run,notify,handler}_seconds      histograms, le = 2^k µs
  ioctls_total{ioctl,errno}, ioctl_seconds{ioctl}      every uffd ioctl (errno "0": success)
  uffd_events_total{comm,event}                        fork, remap, remove, unmap messages
  faults_blocked, oldest_blocked_fault_age_seconds     faults whose thread sleeps now
  lost_events_total{reason}, bpf_run_seconds_total{program}, bpf_runs_total{program},
  process_cpu_seconds_total, startup_seconds, traced_processes, series_dropped_total

targets: by default every process that sets up a userfaultfd, now or later (its UFFDIO_API
ioctl is seen in BPF; processes holding one already are found in /proc at start), with the
processes that handle their faults. --comm REGEX keeps those whose name matches; -p PID traces
only those; --all traces every process. Processes that exit are dropped; their counts stay.

series: labels are chosen by --labels. Past --max-series label sets, a new one is counted in
the series whose comm, pid and vcpu are "other" (series_dropped_total counts them), so a flood
of short-lived pids cannot explode the cardinality, and no count is lost. The vcpu label
(QEMU's "CPU n/KVM" threads) makes BPF keep one aggregate per thread.

stopping: SIGTERM or Ctrl-C detach BPF and close the listening socket.

examples:
  uffdtrace export                                    # 127.0.0.1:9477, every uffd user
  uffdtrace export --listen 0.0.0.0:9477 --comm '^qemu' --labels comm,backing,kind,vcpu
  uffdtrace export -p 4242 --interval 0.5
  curl -s 127.0.0.1:9477/metrics | grep ^uffdtrace_faults_total
"""

from __future__ import annotations

import argparse
import re
import sys

from prometheus_client import start_http_server
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from uffdtrace.commands.options import add_probe_arguments, print_program
from uffdtrace.errors import UserError
from uffdtrace.exporter import Exporter
from uffdtrace.session import Session
from uffdtrace.stats import DEFAULT_LABELS, FAULT_LABELS, Aggregates, StatsFeed, process_comm
from uffdtrace.tracing import plan, trace

DEFAULT_LISTEN = "127.0.0.1:9477"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="ADDR:PORT",
                   help=f"where /metrics is served (default: {DEFAULT_LISTEN}; 0.0.0.0:PORT for "
                        "every interface)")
    p.add_argument("-p", "--pid", type=int, action="append", default=[], metavar="PID",
                   help="trace only this process and its handlers (repeatable)")
    p.add_argument("--comm", type=_regex, metavar="REGEX",
                   help="trace the processes setting up a userfaultfd whose name matches REGEX")
    p.add_argument("--all", action="store_true", help="trace every process")
    p.add_argument("--labels", type=_labels, default=DEFAULT_LABELS, metavar="L1,L2,...",
                   help=f"fault labels, from {','.join(FAULT_LABELS)} (default: "
                        f"{','.join(DEFAULT_LABELS)})")
    p.add_argument("--max-series", type=int, default=2000, metavar="N",
                   help="label sets kept apart at most; the rest are counted as \"other\" "
                        "(default: 2000)")
    p.add_argument("--interval", type=float, default=1.0, metavar="S",
                   help="how often the kernel's aggregates are read (default: 1 s)")
    add_probe_arguments(p, modes=("stats",))


def run(args: argparse.Namespace) -> int:
    addr, port = _listen(args.listen)
    if not 0.05 <= args.interval <= 60:
        raise UserError("--interval must be between 0.05 and 60 s")
    if args.max_series < 1:
        raise UserError("--max-series must be at least 1")
    if args.comm and (args.pid or args.all):
        raise UserError("--comm filters the processes found by themselves: not with -p or --all")
    the_plan = plan(args.pid, [], args.all, "stats", args.backend, args.qmp,
                    discover=not (args.pid or args.all), per_thread="vcpu" in args.labels)
    if args.ebpf:
        print_program(the_plan)
        return 0

    def serve(session: Session, ended) -> None:
        paths = session.backend.paths()
        aggregates = Aggregates(args.labels, paths.of_stats_keys, process_comm, args.max_series,
                                the_plan.vcpus)
        feed = session.feed = StatsFeed(session.backend, aggregates, args.comm, args.interval,
                                        every_process=args.all)
        if the_plan.discover:
            feed.adopt_running()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Exporter(feed, session))
        ProcessCollector(namespace="uffdtrace", registry=registry)
        try:
            server, thread = start_http_server(port, addr, registry=registry)
        except OSError as e:
            raise UserError(f"cannot listen on {args.listen}: {e.strerror}") from e
        print(f"uffdtrace: exporting {the_plan.describe()} on http://{args.listen}/metrics "
              f"({session.backend.name} backend, started in {session.startup_s:.2f} s); "
              "SIGTERM or Ctrl-C to stop", file=sys.stderr, flush=True)
        try:
            session.run(until=lambda: feed.tick() or ended())
        finally:
            server.shutdown()
            server.server_close()
            thread.join()

    trace(the_plan, [], serve)
    print("uffdtrace: exporter stopped", file=sys.stderr)
    return 0


def _listen(text: str) -> tuple[str, int]:
    addr, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--listen {text!r}: give ADDR:PORT, e.g. {DEFAULT_LISTEN}")
    return addr.strip("[]") or "0.0.0.0", int(port)


def _regex(text: str) -> re.Pattern:
    try:
        return re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression: {e}") from e


def _labels(text: str) -> tuple[str, ...]:
    labels = tuple(lb.strip() for lb in text.split(",") if lb.strip())
    unknown = [lb for lb in labels if lb not in FAULT_LABELS]
    if unknown or len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(f"choose distinct labels from {','.join(FAULT_LABELS)}")
    return labels
