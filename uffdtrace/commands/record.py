"""Record every userfaultfd fault of the traced processes: one CSV row per fault.

Each row is one fault from touch to resume (columns in README.md). Times are CLOCK_MONOTONIC
ns; empty cells are what this mode cannot know. A summary follows on stderr (or --json on
stdout): counts by backing x kind, stall and CONTINUE percentiles, lost events, the tracer's
own cost.

stopping: Ctrl-C, SIGTERM or the command's end detach BPF, then plugins get 2 s in total to
catch up (a plugin still busy then gives no tables); a second signal exits at once. A failed
write (full disk, closed pipe) stops tracing: the CSV ends at its last complete row, the
command runs on untraced and is waited for, the summary is printed, and the exit status is 1.

modes:
  light   tracepoints page_fault_user, sched_switch, sched_waking and rseq_update only
          (cheapest); no ioctls or messages, so resolver, msg_ns, continue_ns, handler_ns,
          errno and mapped stay empty, and a fault that never slept is not seen
  full    adds raw syscall tracepoints for uffd ioctls and message reads: every column, and
          one row per ioctl with --ioctls

examples:
  uffdtrace record -o faults.csv -- uffdtrace exercise --pages 20000
  uffdtrace record -o faults.csv --ioctls ioctls.csv -p 4242
  uffdtrace record -p 4242 --duration 10 --mode light -o vm.csv
  uffdtrace record --all -d 5 --json > summary.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from uffdtrace.commands.targeting import (
    add_command_argument,
    add_probe_arguments,
    add_target_arguments,
    chosen_command,
    run_context,
)
from uffdtrace.errors import UserError
from uffdtrace.probes.records import LOST_REASONS, UFFD_EVENTS
from uffdtrace.probes.tracepoint import TraceScope
from uffdtrace.session import Session, stop_on_signals
from uffdtrace.sinks.csv import CsvSink, IoctlCsvSink
from uffdtrace.sinks.plugins import add_plugin_arguments, plugin_sink_from_args
from uffdtrace.summary import format_us
from uffdtrace.targets import LaunchedCommand, alive, check_pids, uffd_inodes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", metavar="FILE.csv",
                   help="per-fault CSV (default: stdout)")
    p.add_argument("--ioctls", metavar="FILE.csv",
                   help="also write one row per uffd ioctl of the traced processes (full mode, "
                        "or any mode of the kprobe and fentry backends): "
                        "REGISTER, COPY, CONTINUE, WAKE... with range, mode, return value, errno, "
                        "mapped bytes, duration and the faults it woke")
    p.add_argument("-d", "--duration", type=float, metavar="S",
                   help="stop after S seconds (default: until Ctrl-C or the command ends)")
    add_probe_arguments(p)
    add_target_arguments(p, "trace this process and all its threads (repeatable); ends when "
                            "they all have")
    p.add_argument("-j", "--json", action="store_true", help="summary as JSON on stdout")
    add_plugin_arguments(p)
    add_command_argument(p)


def run(args: argparse.Namespace) -> int:
    command = chosen_command(args)
    if args.duration is not None and not 0 < args.duration < math.inf:
        raise UserError("--duration must be a positive number of seconds")
    if args.json and not args.output:
        raise UserError("--json prints the summary on stdout: give the CSV a file with -o")
    pids = check_pids(args.pid)
    for pid in pids:
        if not uffd_inodes(pid):
            print(f"uffdtrace: pid {pid} holds no userfaultfd now: its faults show once it opens one",
                  file=sys.stderr)
    ctx = run_context(pids, command, args.mode, args.backend)
    plugin_sink = plugin_sink_from_args(args, ctx, stream=sys.stderr) if args.plugin else None

    launched = LaunchedCommand(command) if command else None
    scope = TraceScope(pids=tuple(pids) + ((launched.pid,) if launched else ()),
                       all=args.all, follow_children=bool(launched))
    sinks = []
    try:
        sinks.append(CsvSink(args.output) if args.output else CsvSink(None, stream=sys.stdout))
        if args.ioctls:
            sinks.append(IoctlCsvSink(args.ioctls))
    except OSError as e:
        if launched:
            launched.terminate()
        for sink in sinks:
            sink.close()
        raise UserError(f"cannot write {e.filename}: {e.strerror}") from e
    session = Session(args.mode, scope, [*sinks, *([plugin_sink] if plugin_sink else [])],
                      requested_backend=args.backend)
    session.on_stuck = lambda f, age_s: print(
        f"uffdtrace: a fault has been blocked for {age_s:.1f} s: pid {f.pid} tid {f.tid} address "
        f"{f.addr:#x} (is its handler alive?)", file=sys.stderr, flush=True)
    stop_on_signals(session, launched)
    try:
        session.start()
        if args.ioctls and not session.backend.sees_ioctls():
            raise UserError(f"--ioctls: the {session.backend.name} backend does not trace ioctls "
                            f"in {args.mode} mode (use --mode full)")
        what = (f"command {' '.join(command)}" if launched else
                "all processes" if args.all else "pid " + ", ".join(map(str, pids)))
        print(f"uffdtrace: tracing {what} ({session.backend.name} backend, {args.mode} mode), "
              f"started in {session.startup_s:.2f} s; Ctrl-C to stop", file=sys.stderr)
        if launched:
            launched.release()
        session.run(until=lambda: (launched.poll() is not None) if launched else
                    bool(pids) and not any(alive(p) for p in pids), duration_s=args.duration)
    finally:
        if launched and launched.poll() is None and session.write_error is None:
            launched.terminate()
            launched.wait()
        info = session.close()
    if session.write_error is not None:
        failed_write(session.write_error)
        if launched:
            launched.wait()  # a tracer must not break what it traces: it runs on, untraced
    summary = build_summary(session, info, args.mode, launched)
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
    else:
        print_summary(summary, sys.stderr)
    incomplete = plugin_sink and (plugin_sink.failed or plugin_sink.cut)
    return 1 if session.write_error or incomplete else 0


def failed_write(error: OSError) -> None:
    print(f"uffdtrace: writing {error.filename or 'the output'} failed: "
          f"{error.strerror or error}; stopped tracing", file=sys.stderr, flush=True)
    if error.filename == sys.stdout.name:  # nothing may reach it now, not even Python's flush at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def build_summary(session: Session, info: dict, mode: str, launched) -> dict:
    stats = session.stats
    lost = info.get("lost", dict.fromkeys(LOST_REASONS, 0))
    return {
        "backend": session.backend.name if session.backend else "tracepoint",
        "hooks": session.backend.attached if session.backend else {},
        "mode": mode,
        "faults": stats.faults,
        "by_backing_kind": [{"backing": b, "kind": k, "faults": n}
                            for (b, k), n in sorted(stats.counts.items())],
        "outcomes": stats.outcomes,
        "errnos": {str(e): n for e, n in sorted(stats.errnos.items())},
        "stall": stats.latency("stall"),
        "continue": stats.latency("continue"),
        "stall_hist_log2_us": info.get("stall_hist", []),
        "continue_hist_log2_us": info.get("continue_hist", []),
        "lost": lost,
        "lost_total": sum(lost.values()),
        "uffd_events": [{"pid": p, "event": UFFD_EVENTS.get(e, str(e)), "count": n}
                        for (p, e), n in sorted(info.get("uffd_events", {}).items())],
        "registers": info.get("registers", []),
        "uffd_ranges_at_start": info.get("ranges_at_start", []),
        "ioctls": [{"ioctl": name, "errno": err, "count": n}
                   for (name, err), n in sorted(info.get("ioctls", {}).items())],
        "messages_matched_by_address": info.get("messages", {}).get("matched_by_address", 0),
        "messages_unmatched": info.get("messages", {}).get("unmatched", 0),
        "startup_s": round(session.startup_s, 3),
        "compile_s": round(session.backend.compile_s, 3) if session.backend else None,
        "bpf_run_ns": info.get("bpf_run_ns"),
        "bpf_run_cnt": info.get("bpf_run_cnt"),
        "tracer_cpu_s": round(info["tracer_cpu_s"], 3),
        "wall_s": round(info["wall_s"], 3),
        "command_exit": launched.returncode if launched else None,
    }


def print_summary(s: dict, out) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"\n{s['faults']} faults ({s['backend']} backend, {s['mode']} mode)")
    if s["hooks"]:
        p("  kprobes: " + ", ".join(f"{hook}={symbol or 'absent'}" for hook, symbol in s["hooks"].items()))
    for row in s["by_backing_kind"]:
        p(f"  {row['backing']:>8} {row['kind']:<8} {row['faults']}")
    for name in ("stall", "continue"):
        lat = s[name]
        if lat["count"]:
            p(f"  {name:>8} us: p50 {format_us(lat['p50_ns'])}  p90 {format_us(lat['p90_ns'])}"
              f"  p99 {format_us(lat['p99_ns'])}  max {format_us(lat['max_ns'])}  (n={lat['count']})")
    if s["errnos"]:
        p("  errnos: " + ", ".join(f"{e}x{n}" for e, n in s["errnos"].items()))
    unresolved = s["outcomes"].get("unresolved_exit", 0)
    if unresolved:
        p(f"  {unresolved} faults still in flight when their thread exited")
    if s["outcomes"].get("unresolved_end"):
        p(f"  {s['outcomes']['unresolved_end']} faults still blocked when tracing ended")
    if s["messages_matched_by_address"]:
        p(f"  {s['messages_matched_by_address']} fault messages named no thread (no "
          "UFFD_FEATURE_THREAD_ID): matched to their faults by address space and page")
    if s["messages_unmatched"]:
        p(f"  {s['messages_unmatched']} fault messages matched no traced fault (an untraced "
          "thread's, or read after the fault had ended)")
    for r in s["uffd_ranges_at_start"]:
        p(f"  registered before tracing: pid {r['pid']} {r['start']:#x}+{r['len']:#x} "
          f"{'|'.join(r['modes'])}")
    for ev in s["uffd_events"]:
        p(f"  uffd event {ev['event']} in pid {ev['pid']}: {ev['count']}")
    lost = ", ".join(f"{k}={v}" for k, v in s["lost"].items() if v) or "none"
    p(f"  lost events: {s['lost_total']} ({lost})")
    run_ms = (s["bpf_run_ns"] or 0) / 1e6
    p(f"  tracer cost: BPF {run_ms:.1f} ms in {s['bpf_run_cnt'] or 0} runs, process CPU "
      f"{s['tracer_cpu_s']:.2f} s over {s['wall_s']:.2f} s; start-up {s['startup_s']:.2f} s "
      f"(compile {s['compile_s']} s)")
