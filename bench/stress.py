"""`python -m bench.stress` (`make stress`): attribution under stress, fault by fault against
ground truth (issue #12, requirement 4).

Each configuration runs `uffdtrace record --mode full|light -- uffdtrace exercise ...` (or
`uffdtrace migrate ...`) several times, unpinned on every CPU, and holds each recording
against the workload's own ground truth:

- rows are matched to the exerciser's faults (`--csv`, one per message its handlers read) by
  thread and page, in time order for the rare page faulted twice by one thread;
- **lost**: a ground-truth fault without a row; **extra**: a row without a ground-truth fault.
  Policy `prefetch` is the one exception, as in tests/test_tracer.py: a fault the prefetcher
  resolved before any handler read its message is a real fault that the message-based ground
  truth lacks. Such a row is `explained` when its page is one its thread touches (the
  exerciser's own touch plan) and the thread that woke it made a successful prefetch of the
  page (ops CSV); otherwise it is extra; **foreign**: a row of a process other than the
  workload's (the tracer followed a process it was never given);
- **misattributed** (full mode): `compare.misattributed`, the resolving thread, ioctl and
  address against the exerciser's ioctl log; **unrecorded** ioctls (full mode):
  `compare.unrecorded_ioctls`; **errno**: fault rows whose errno is not 0 (full mode); and
  `mislabeled`: rows whose kind, backing or page size, when given, is wrong, or whose outcome
  is neither resolved nor no_wait;
- **lost_total**: records the tracer could not submit (its summary).

Light mode reads handlers' messages too, so a fault mapped before its thread slept is
recorded (`no_wait`) in both modes; the target is 0 everywhere.

Shown, not judged: `no_wait` rows (faults mapped before their thread slept) and `no_msg`
(matched rows without msg_ns, though a handler read their message).

A migration (`uffdtrace migrate`) writes no per-fault file, but each vCPU touches each page of
its own contiguous share once, so the faulting thread of every page is known; with prefetch off
every page faults. See `check_migration` for what is compared.

Work files go to /dev/shm and are deleted after each run is checked; a failing run's files are
moved to --keep (default /tmp/uffdtrace-stress) with a diagnosis.txt, and the path is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.table import format_table
from bench.tracer_bench import UFFDTRACE
from uffdtrace.exerciser.compare import misattributed, unrecorded_ioctls
from uffdtrace.exerciser.config import ExerciseConfig, touch_plan

TARGET_FAULTS = 10_000_000
KEEP_DIR = Path("/tmp/uffdtrace-stress")
RUN_TIMEOUT_S = 1800
# The columns of a recording that the checks read (a 1M-row CSV stays a few hundred MB).
REC_COLUMNS = ["fault_ns", "pid", "tid", "addr", "page_size", "backing", "kind", "resolver",
               "handler_pid", "handler_tid", "errno", "msg_ns", "cont_enter_ns", "outcome"]
COUNTS = ("faults", "rows", "lost", "extra", "foreign", "explained", "misattributed", "unrecorded",
          "errno", "mislabeled", "lost_total", "no_wait", "no_msg")
COLUMNS = ["name", "mode", "runs", *COUNTS, "wall_s"]
MUST_BE_ZERO = ("lost", "extra", "foreign", "misattributed", "unrecorded", "errno", "mislabeled",
                "lost_total")
UFFDIO_REGISTER_MODE_MINOR = 4
EEXIST = 17
SAMPLES = 5  # examples per kind of failure in diagnosis.txt


# --- configurations --------------------------------------------------------------------------


@dataclass(frozen=True)
class Exercise:
    """One `uffdtrace exercise` workload; `pages` per run (= faults, but for prefetch)."""

    pages: int
    backing: str = "shmem"
    threads: int = 4
    handler_threads: int = 1
    handler: str = "thread"
    policy: str = "continue"
    pattern: str = "random"
    stale_fraction: float = 0.0
    write_fraction: float = 0.0
    thread_id: bool = True
    continue_twice: bool = False
    prefetch_interval_us: float = 0.0
    fetch_delay_us: float = 0.0

    @property
    def name(self) -> str:
        policy = f"copy {self.stale_fraction:g}" if self.policy == "copy" else self.policy
        if self.prefetch_interval_us:
            policy += f" {self.prefetch_interval_us:g}us"
        name = (f"{self.backing} {policy} {self.pattern} t{self.threads} "
                f"h{self.handler_threads} {self.handler}")
        if self.fetch_delay_us:
            name += f" fetch {self.fetch_delay_us:g}us"
        return name + " no-tid" * (not self.thread_id) + " twice" * self.continue_twice

    def config(self, seed: int) -> ExerciseConfig:
        return ExerciseConfig(
            backing=self.backing, pages=self.pages, threads=self.threads,
            handler_threads=self.handler_threads, handler=self.handler, policy=self.policy,
            pattern=self.pattern, stale_fraction=self.stale_fraction,
            write_fraction=self.write_fraction, thread_id=self.thread_id,
            continue_twice=self.continue_twice, prefetch_interval_us=self.prefetch_interval_us,
            fetch_delay_us=self.fetch_delay_us, seed=seed).validated()

    def args(self, seed: int) -> list[str]:
        args = ["--backing", self.backing, "--pages", str(self.pages), "--threads",
                str(self.threads), "--handler-threads", str(self.handler_threads), "--handler",
                self.handler, "--policy", self.policy, "--pattern", self.pattern, "--seed", str(seed)]
        if self.stale_fraction:
            args += ["--stale-fraction", str(self.stale_fraction)]
        if self.write_fraction:
            args += ["--write-fraction", str(self.write_fraction)]
        if self.prefetch_interval_us:
            args += ["--prefetch-interval-us", str(self.prefetch_interval_us)]
        if self.fetch_delay_us:
            args += ["--fetch-delay-us", str(self.fetch_delay_us)]
        if not self.thread_id:
            args.append("--no-thread-id")
        if self.continue_twice:
            args.append("--continue-twice")
        return args

    def scaled(self, factor: float) -> Exercise:
        floor = 64 if self.backing == "hugetlb" else 5000
        return replace(self, pages=max(floor, int(self.pages * factor)))


@dataclass(frozen=True)
class Migration:
    """One `uffdtrace migrate` run (shmem, post-copy after `rounds` precopy rounds)."""

    size_mib: int
    prefetch: bool
    vcpus: int = 4
    bandwidth_gbit: float = 10.0
    rounds: int = 1
    dirty_rate: int = 40000
    pattern: str = "random"
    backing: str = "shmem"

    @property
    def name(self) -> str:
        return (f"migrate {self.backing} {self.size_mib} MiB prefetch "
                f"{'on' if self.prefetch else 'off'} {self.vcpus} vCPUs")

    def args(self, seed: int) -> list[str]:
        return ["--size", str(self.size_mib), "--backing", self.backing, "--vcpus", str(self.vcpus),
                "--bandwidth", str(self.bandwidth_gbit), "--rounds", str(self.rounds),
                "--dirty-rate", str(self.dirty_rate), "--pattern", self.pattern,
                "--prefetch", "on" if self.prefetch else "off", "--seed", str(seed)]

    def scaled(self, factor: float) -> Migration:
        return replace(self, size_mib=max(16, int(self.size_mib * factor)))


@dataclass(frozen=True)
class Config:
    mode: str                        # full | light
    work: Exercise | Migration
    runs: int

    @property
    def name(self) -> str:
        return self.work.name


def _ex(mode: str, runs: int, **kw: Any) -> Config:
    return Config(mode, Exercise(**kw), runs)


# Every policy, both backings, random and seq, 2-8 faulting threads, 1-2 handler threads as
# threads and as a separate process, the foreign-handler options, both modes; all unpinned.
# Shmem runs are 400-500k faults (the CSVs of a run stay under ~0.5 GB); hugetlb pages are
# 2 MiB, so 600 per run (1.2 GB, reserved and given back by the exerciser), repeated.
CONFIGS: list[Config] = [
    _ex("full", 2, pages=500_000, threads=4, handler_threads=1, policy="continue"),
    _ex("light", 2, pages=500_000, threads=4, handler_threads=1, policy="continue"),
    _ex("full", 2, pages=500_000, threads=8, handler_threads=2, handler="process", policy="copy",
        stale_fraction=0.3, pattern="seq", write_fraction=0.3),
    _ex("light", 2, pages=500_000, threads=8, handler_threads=2, handler="process",
        policy="copy", stale_fraction=0.3, pattern="seq", write_fraction=0.3),
    _ex("full", 2, pages=500_000, threads=2, handler_threads=2, policy="batch", pattern="seq"),
    _ex("light", 2, pages=500_000, threads=6, handler_threads=1, handler="process",
        policy="batch"),
    _ex("full", 2, pages=500_000, threads=4, handler_threads=2, handler="process",
        policy="prefetch"),
    _ex("light", 2, pages=500_000, threads=2, handler_threads=1, policy="prefetch", pattern="seq"),
    _ex("full", 2, pages=500_000, threads=8, handler_threads=2, handler="process",
        thread_id=False, continue_twice=True),
    _ex("light", 2, pages=500_000, threads=2, handler_threads=1, pattern="seq",
        thread_id=False, continue_twice=True),
    _ex("full", 2, pages=500_000, threads=4, handler_threads=1, policy="copy",
        stale_fraction=0.5, thread_id=False),
    _ex("full", 2, pages=500_000, threads=6, handler_threads=2, continue_twice=True,
        write_fraction=0.5),
    _ex("full", 2, pages=400_000, threads=3, handler_threads=1, handler="process",
        policy="batch", thread_id=False),
    _ex("light", 2, pages=400_000, threads=8, handler_threads=2, policy="copy",
        stale_fraction=0.1, continue_twice=True),
    _ex("full", 5, pages=600, backing="hugetlb", threads=4, handler_threads=2,
        handler="process"),
    _ex("light", 5, pages=600, backing="hugetlb", threads=8, handler_threads=1, policy="copy",
        stale_fraction=0.5, pattern="seq"),
    _ex("full", 5, pages=600, backing="hugetlb", threads=2, handler_threads=1, policy="batch"),
    _ex("light", 5, pages=600, backing="hugetlb", threads=4, handler_threads=2, handler="process",
        policy="prefetch", prefetch_interval_us=5),
    _ex("full", 5, pages=600, backing="hugetlb", threads=4, handler_threads=2, policy="prefetch",
        pattern="seq", prefetch_interval_us=5),
    _ex("full", 5, pages=600, backing="hugetlb", threads=6, handler_threads=2, handler="process",
        thread_id=False, continue_twice=True),
    _ex("light", 5, pages=600, backing="hugetlb", threads=2, handler_threads=1, pattern="seq",
        thread_id=False, continue_twice=True),
    Config("full", Migration(256, prefetch=False, vcpus=4), 2),
    Config("full", Migration(256, prefetch=True, vcpus=2), 2),
    Config("full", Migration(256, prefetch=True, vcpus=8, pattern="seq", rounds=0,
                             bandwidth_gbit=2.0), 2),
]


# --- one run ---------------------------------------------------------------------------------


@dataclass
class RunResult:
    counts: dict[str, int]
    wall_s: float
    samples: dict[str, pd.DataFrame]   # examples per failure kind, for diagnosis.txt
    notes: list[str]

    @property
    def failed(self) -> bool:
        return bool(self.notes) or any(self.counts.get(k) for k in MUST_BE_ZERO)


def record(workdir: Path, mode: str, command: list[str], stdout_to: Path | None = None,
           ) -> tuple[dict[str, Any], float, str]:
    """`uffdtrace record` around `command` (stdout to `stdout_to`): (summary, wall, stderr)."""
    ioctls = ["--ioctls", str(workdir / "io.csv")] if mode == "full" else []
    shell = "exec " + shlex.join(command)
    if stdout_to is not None:
        shell += f" > {shlex.quote(str(stdout_to))}"
    t0 = time.monotonic()
    out = subprocess.run([*UFFDTRACE, "record", "--mode", mode, "-o", str(workdir / "rec.csv"),
                          *ioctls, "--json", "--", "sh", "-c", shell],
                         capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    wall = time.monotonic() - t0
    (workdir / "record.stderr").write_text(out.stderr)
    (workdir / "record.json").write_text(out.stdout)
    if out.returncode != 0:
        raise RuntimeError(f"record exited {out.returncode}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout), wall, out.stderr


def read_rows(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, usecols=REC_COLUMNS, dtype={
        "backing": "category", "kind": "category", "resolver": "category", "outcome": "category"})


def run_exercise(workdir: Path, mode: str, work: Exercise, seed: int) -> RunResult:
    gt_csv, ops_csv, gt_json = workdir / "gt.csv", workdir / "ops.csv", workdir / "gt.json"
    command = [*UFFDTRACE, "exercise", *work.args(seed), "--csv", str(gt_csv),
               "--ops-csv", str(ops_csv), "--json"]
    summary, wall, _ = record(workdir, mode, command, stdout_to=gt_json)
    notes = []
    if summary["command_exit"] != 0 or not gt_json.exists() or not gt_json.read_text().strip():
        notes.append(f"exerciser exited {summary['command_exit']}")
        return RunResult({"lost_total": summary["lost_total"]}, wall, {}, notes)
    truth = json.loads(gt_json.read_text())
    if truth["overflows"] or truth["mismatches"]:
        notes.append(f"exerciser: {truth['overflows']} overflows, {truth['mismatches']} mismatches")
    rec = read_rows(workdir / "rec.csv")
    gt, ops = pd.read_csv(gt_csv), pd.read_csv(ops_csv)
    io = pd.read_csv(workdir / "io.csv") if mode == "full" else None
    counts, samples = check_exercise(rec, gt, ops, truth, work, seed, mode, io)
    counts["lost_total"] = summary["lost_total"]
    if io is not None:
        strangers = io[~io["pid"].isin([truth["pid"], truth["handler_pid"]])]
        if len(strangers):
            notes.append(f"{len(strangers)} ioctls of other processes recorded: "
                         f"{strangers.groupby(['pid', 'comm', 'ioctl']).size().to_dict()}")
    return RunResult(counts, wall, samples, notes)


def touch_owner(work: Exercise, seed: int) -> np.ndarray:
    """The exerciser's plan: for each page, the index of the thread that first-touches it."""
    plan = touch_plan(work.config(seed))
    owner = np.full(work.pages, -1, dtype=np.int64)
    for thread in range(work.threads):
        lo, hi = plan.thread_start[thread], plan.thread_start[thread + 1]
        owner[plan.touch_page[lo:hi]] = thread
    return owner


def _with_occurrence(df: pd.DataFrame, order: str) -> pd.DataFrame:
    """`k`: the n-th fault of the same thread on the same page, in time order."""
    df = df.sort_values(order, kind="stable")
    return df.assign(k=df.groupby(["tid", "page"]).cumcount())


def check_exercise(rec: pd.DataFrame, gt: pd.DataFrame, ops: pd.DataFrame, truth: dict[str, Any],
                   work: Exercise, seed: int, mode: str, io: pd.DataFrame | None,
                   ) -> tuple[dict[str, int], dict[str, pd.DataFrame]]:
    """Per-fault counts of one exerciser run (see the module), and examples of each failure."""
    ps = truth["page_size"]
    rows = rec.assign(page=rec["addr"] // ps * ps, row=np.arange(len(rec)))
    foreign = rows[rows["pid"] != truth["pid"]]
    ours = _with_occurrence(rows[rows["pid"] == truth["pid"]], "fault_ns")
    faults = _with_occurrence(gt.assign(page=gt["addr"] // ps * ps, gt_row=np.arange(len(gt))),
                              "msg_ns")
    joined = faults[["tid", "page", "k", "gt_row"]].merge(
        ours[["tid", "page", "k", "row"]], on=["tid", "page", "k"], how="outer")
    lost = gt.iloc[joined.loc[joined["row"].isna(), "gt_row"].astype(np.int64)]
    unmatched = rows.iloc[joined.loc[joined["gt_row"].isna(), "row"].astype(np.int64)]
    matched = rows.iloc[joined["row"].dropna().astype(np.int64)].drop(unmatched.index)

    explained = unmatched.iloc[:0]
    if work.policy == "prefetch" and len(unmatched):
        # Faults the prefetcher resolved before a handler read their message: the page is one
        # this thread touches, and the waker prefetched it successfully.
        owner = touch_owner(work, seed)
        thread_of_tid = dict(zip(gt["tid"], gt["thread"], strict=True))
        prefetched = ops[(ops["role"] == "prefetch") & (ops["errno"] == 0)]
        by_prefetcher = pd.MultiIndex.from_arrays([prefetched["handler_tid"], prefetched["addr"]])
        # page 0's address: every page is mapped once by a successful op
        base = int((gt["addr"] - gt["page"] * ps).iloc[0]) if len(gt) else int(
            ops.loc[ops["errno"] == 0, "addr"].min())
        page_index = ((unmatched["page"] - base) // ps).to_numpy()
        in_range = (page_index >= 0) & (page_index < work.pages)
        planned = owner[np.clip(page_index, 0, work.pages - 1)]
        known = unmatched["tid"].map(thread_of_tid)
        own_page = in_range & (known.isna().to_numpy() | (known.to_numpy() == planned))
        woken_by_prefetch = pd.MultiIndex.from_arrays(
            [unmatched["handler_tid"].fillna(-1).astype(np.int64), unmatched["page"]]
        ).isin(by_prefetcher)
        single = ~unmatched.duplicated(["tid", "page"], keep=False).to_numpy()
        explained = unmatched[own_page & woken_by_prefetch & single]
    extra = unmatched.drop(explained.index)
    seen = pd.concat([matched, explained])

    wrong_label = seen[(seen["kind"].notna() & (seen["kind"] != "minor"))
                       | (seen["backing"].notna() & (seen["backing"] != work.backing))
                       | (seen["page_size"].notna() & (seen["page_size"] != ps))
                       | ~seen["outcome"].isin(["resolved", "no_wait"])]
    samples = {"lost": lost, "extra": extra, "foreign": foreign, "mislabeled": wrong_label}
    counts = {
        "faults": len(gt), "rows": len(rec), "lost": len(lost), "extra": len(extra),
        "foreign": len(foreign), "explained": len(explained), "mislabeled": len(wrong_label),
        "no_wait": int((seen["outcome"] == "no_wait").sum()),
    }
    no_msg = matched[matched["msg_ns"].isna()]  # both modes read messages
    counts["no_msg"] = len(no_msg)
    samples["no_msg"] = no_msg
    if mode == "full":
        wrong = attribution_errors(pd.concat([seen, extra]), ops)
        bad_errno = seen[seen["errno"].fillna(-1) != 0]
        # ioctls of other processes are not the workload's (foreign, see run_exercise)
        missing = unrecorded_ioctls(io[io["pid"].isin([truth["pid"], truth["handler_pid"]])], ops)
        counts.update(misattributed=len(wrong), errno=len(bad_errno), unrecorded=len(missing))
        samples.update(misattributed=wrong, errno=bad_errno, unrecorded=missing)
    return counts, {k: v for k, v in samples.items() if len(v)}


def attribution_errors(rows: pd.DataFrame, ops: pd.DataFrame) -> pd.DataFrame:
    """`misattributed` on the rows, plus rows that name a resolver but no thread or instant
    (merge_asof cannot take those)."""
    named = rows["resolver"].notna()
    incomplete = named & (rows["handler_tid"].isna() | rows["cont_enter_ns"].isna())
    return pd.concat([rows[incomplete], misattributed(rows[~incomplete], ops)])


def run_migration(workdir: Path, mode: str, work: Migration, seed: int) -> RunResult:
    mig_json = workdir / "migration.json"
    command = [*UFFDTRACE, "migrate", *work.args(seed), "--json-out", str(mig_json)]
    summary, wall, _ = record(workdir, mode, command, stdout_to=Path(os.devnull))
    if summary["command_exit"] != 0 or not mig_json.exists():
        return RunResult({"lost_total": summary["lost_total"]}, wall, {},
                         [f"migrate exited {summary['command_exit']}"])
    s = json.loads(mig_json.read_text())
    rec = read_rows(workdir / "rec.csv")
    io = pd.read_csv(workdir / "io.csv") if mode == "full" else None
    counts, samples, notes = check_migration(rec, s, mode, io)
    counts["lost_total"] = summary["lost_total"]
    return RunResult(counts, wall, samples, notes)


def check_migration(rec: pd.DataFrame, s: dict[str, Any], mode: str, io: pd.DataFrame | None,
                    ) -> tuple[dict[str, int], dict[str, pd.DataFrame], list[str]]:
    """One traced migration against what the scenario knows.

    Per fault: vCPU i touches each page of [pages*i/vcpus, pages*(i+1)/vcpus) once, so a row
    must be a vCPU's fault on a page of its own share, at most once (else extra; a row of
    another process than the target is foreign); with prefetch
    off every page faults (a page without its row is lost). The guest memory's address is
    the target's MINOR registration in the ioctl CSV (its length must be the guest's).
    Counts (test_tracer_counts_equal_demand_faults and more): rows whose message a handler read
    (msg_ns, full mode) = the scenario's messages (`demand_faults`; short: lost, over: extra); a
    row without message must be woken by the prefetcher (else extra; with prefetch off, none);
    rows resolved by the demand handler's CONTINUE = `handler_continues`; the ioctl CSV's
    CONTINUE and WAKE counts = the scenario's (handler CONTINUEs, prefetcher CONTINUEs =
    `prefetched`, EEXIST = `eexist`, WAKE = `eexist`), off by: unrecorded. Misattributed: a
    resolver other than the handler's or prefetcher's CONTINUE or WAKE, or not an ioctl of that
    thread under way at cont_enter_ns over the page (`misattributed` on the ioctl CSV)."""
    notes: list[str] = []
    if mode != "full":
        raise ValueError("migrations are checked in full mode (the register and message rows)")
    assert io is not None
    ps, pages, target = s["page_size"], s["pages"], s["target_pid"]
    if not s["memory_equal"]:
        notes.append(f"memory differs in {s['mismatched_pages']} pages")
    regs = io[(io["pid"] == target) & (io["ioctl"] == "REGISTER") & (io["errno"] == 0)
              & ((io["mode"] & UFFDIO_REGISTER_MODE_MINOR) != 0)]
    if len(regs) != 1 or regs["len"].iloc[0] != pages * ps:
        notes.append(f"target registrations {regs[['start', 'len', 'mode']].to_dict('records')} "
                     f"are not the guest's {pages} pages")
        base = 0
    else:
        base = int(regs["start"].iloc[0])
    tids = [v["tid"] for v in s["vcpu_blocktime"]]
    vcpus = len(tids)
    bounds = np.array([pages * i // vcpus for i in range(vcpus + 1)])
    rows = rec.assign(page=(rec["addr"] - base) // ps)
    foreign = rows[rows["pid"] != target]
    mine = rows[rows["pid"] == target]
    vcpu = mine["tid"].map({t: i for i, t in enumerate(tids)})
    page = mine["page"].to_numpy()
    owner = np.searchsorted(bounds, np.clip(page, 0, pages - 1), side="right") - 1
    own = vcpu.notna().to_numpy() & (page >= 0) & (page < pages) & (owner == vcpu.fillna(-1).to_numpy())
    first = ~mine.duplicated(["tid", "page"]).to_numpy()
    valid = mine[own & first]
    extra = [mine[~(own & first)]]

    with_msg = valid[valid["msg_ns"].notna()]
    without = valid[valid["msg_ns"].isna()]
    by_prefetcher = (without["handler_tid"] == s["prefetch_tid"]) & (without["resolver"] == "CONTINUE")
    explained = without[by_prefetcher] if s["prefetch_tid"] else without.iloc[:0]
    extra.append(without.drop(explained.index))
    lost = max(0, s["demand_faults"] - len(with_msg))
    surplus = max(0, len(with_msg) - s["demand_faults"])
    lost_pages = pd.DataFrame()
    if not s["config"]["prefetch"]:
        every = pd.DataFrame({"page": np.arange(pages)})
        every["tid"] = np.asarray(tids)[np.searchsorted(bounds, every["page"], side="right") - 1]
        missing = every.merge(valid[["tid", "page"]], how="left", indicator=True)
        lost_pages = missing[missing["_merge"] == "left_only"]
        lost = max(lost, len(lost_pages))
        if s["demand_faults"] != pages:
            notes.append(f"prefetch off, yet {s['demand_faults']} messages for {pages} pages")
    extra_rows = pd.concat(extra)
    if surplus:
        extra_rows = pd.concat([extra_rows, with_msg.tail(surplus)])

    # resolvers
    ops = pd.DataFrame({
        "handler_tid": io["tid"], "op": io["ioctl"].str.lower(), "start_ns": io["enter_ns"],
        "end_ns": io["exit_ns"], "addr": io["start"], "len": io["len"], "errno": io["errno"]})
    resolvers = {s["handler_tid"], s["prefetch_tid"]} - {None}
    seen = pd.concat([with_msg, explained])
    wrong = pd.concat([
        attribution_errors(seen, ops[ops["op"].isin(["continue", "wake"])]),
        seen[~seen["handler_tid"].isin(resolvers)],
    ])
    wrong = wrong[~wrong.index.duplicated()]
    by_handler = seen[(seen["resolver"] == "CONTINUE") & (seen["handler_tid"] == s["handler_tid"])]
    if len(by_handler) != s["handler_continues"]:
        notes.append(f"{len(by_handler)} rows resolved by the handler's CONTINUE, "
                     f"{s['handler_continues']} successful handler CONTINUEs")

    # ioctls against the scenario's counts
    strangers = io[(io["pid"] != target) & io["ioctl"].isin(["CONTINUE", "COPY", "ZEROPAGE", "WAKE"])]
    if len(strangers):   # the source and the parent make no uffd ioctls
        notes.append(f"{len(strangers)} ioctls of other processes recorded: "
                     f"{strangers.groupby(['pid', 'comm', 'ioctl']).size().to_dict()}")
    io = io[io["pid"] == target]
    cont, wake = io[io["ioctl"] == "CONTINUE"], io[io["ioctl"] == "WAKE"]
    expected = {
        "handler CONTINUE ok": (((cont["tid"] == s["handler_tid"]) & (cont["errno"] == 0)).sum(),
                                s["handler_continues"]),
        "prefetcher CONTINUE": ((cont["tid"] == s["prefetch_tid"]).sum(), s["prefetched_pages"]),
        "CONTINUE EEXIST": ((cont["errno"] == EEXIST).sum(), s["eexist"]),
        "CONTINUE failed otherwise": (((cont["errno"] != 0) & (cont["errno"] != EEXIST)).sum(), 0),
        "WAKE": (len(wake), s["eexist"]),
    }
    unrecorded = 0
    for what, (ours, theirs) in expected.items():
        if ours != theirs:
            notes.append(f"{what}: {ours} recorded, {theirs} made")
            unrecorded += abs(int(ours) - int(theirs))

    wrong_label = seen[(seen["kind"].notna() & (seen["kind"] != "minor"))
                       | (seen["backing"].notna() & (seen["backing"] != s["config"]["backing"]))
                       | (seen["page_size"].notna() & (seen["page_size"] != ps))
                       | ~seen["outcome"].isin(["resolved", "no_wait"])]
    bad_errno = seen[seen["errno"].fillna(-1) != 0]
    counts = {
        "faults": s["demand_faults"], "rows": len(rec), "lost": lost, "extra": len(extra_rows),
        "foreign": len(foreign), "explained": len(explained), "misattributed": len(wrong),
        "unrecorded": unrecorded, "errno": len(bad_errno), "mislabeled": len(wrong_label),
        "no_wait": int((seen["outcome"] == "no_wait").sum()),
    }
    samples = {"lost": lost_pages, "extra": extra_rows, "foreign": foreign, "misattributed": wrong,
               "errno": bad_errno, "mislabeled": wrong_label}
    return counts, {k: v for k, v in samples.items() if len(v)}, notes


# --- diagnosis of a failing run --------------------------------------------------------------


def diagnose(workdir: Path, result: RunResult, page_size: int | None) -> str:
    """Examples of each failure: the row, and (exerciser) its ground truth and the ops and
    recorded ioctls on its page."""
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 40)
    lines = [f"counts: {result.counts}", *(f"note: {n}" for n in result.notes)]
    if (workdir / "record.json").exists():
        summary = json.loads((workdir / "record.json").read_text())
        lines.append("record summary: " + json.dumps({k: summary.get(k) for k in (
            "faults", "outcomes", "errnos", "lost", "messages_matched_by_address",
            "messages_unmatched", "ioctls")}))
    ops = _maybe_csv(workdir / "ops.csv")
    gt = _maybe_csv(workdir / "gt.csv")
    io = _maybe_csv(workdir / "io.csv")
    rec = _maybe_csv(workdir / "rec.csv")
    for kind, df in result.samples.items():
        lines.append(f"\n=== {kind}: {len(df)} (first {SAMPLES})")
        for _, row in df.head(SAMPLES).iterrows():
            lines.append("--- " + " ".join(f"{k}={v}" for k, v in row.items()))
            if page_size is None or "addr" not in row or pd.isna(row["addr"]):
                continue
            page = int(row["addr"]) // page_size * page_size
            for name, table, column in (("ground truth", gt, "addr"), ("ops", ops, "addr"),
                                        ("recorded ioctls", io, "start"),
                                        ("recorded rows", rec, "addr")):
                if table is not None:
                    hits = table[table[column] // page_size * page_size == page]
                    if len(hits):
                        lines.append(f"{name} of page {page:#x}:\n{hits.to_string()}")
    return "\n".join(lines) + "\n"


def _maybe_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


# --- configurations, tabulated ---------------------------------------------------------------


def run_config(cfg: Config, workroot: Path | None = None, keep: Path = KEEP_DIR,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """All runs of one configuration: the table row (sums over runs) and `kept`, the
    directories of failing runs."""
    row: dict[str, Any] = {"name": cfg.name, "mode": cfg.mode, "runs": cfg.runs,
                           **dict.fromkeys(COUNTS, 0), "wall_s": 0.0, "kept": [], "notes": []}
    if cfg.mode == "light":
        for key in ("misattributed", "unrecorded", "errno"):
            row[key] = None    # light mode has no ioctls: not checked
    if isinstance(cfg.work, Migration):
        row["no_msg"] = None   # a row without message is explained (prefetcher) or extra
    for i in range(cfg.runs):
        seed = i + 1
        workdir = Path(tempfile.mkdtemp(prefix="stress-", dir=workroot))
        try:
            if isinstance(cfg.work, Migration):
                result = run_migration(workdir, cfg.mode, cfg.work, seed)
                page_size = 4096 if cfg.work.backing == "shmem" else 2 << 20
            else:
                result = run_exercise(workdir, cfg.mode, cfg.work, seed)
                page_size = cfg.work.config(seed).page_size
        except Exception as e:  # a run that could not be checked counts as a failure
            result = RunResult({}, 0.0, {}, [f"{type(e).__name__}: {e}"])
            page_size = None
        for key, value in result.counts.items():
            if row.get(key) is not None:
                row[key] += int(value)
        row["wall_s"] += result.wall_s
        row["notes"] += result.notes
        if result.failed:
            keep.mkdir(parents=True, exist_ok=True)
            (workdir / "config.txt").write_text(f"{cfg}\nseed {seed}\n")
            (workdir / "diagnosis.txt").write_text(diagnose(workdir, result, page_size))
            kept = keep / workdir.name
            shutil.move(str(workdir), kept)
            row["kept"].append(str(kept))
            log(f"stress: FAILED run {i + 1} of {cfg.name} ({cfg.mode}): "
                f"{ {k: v for k, v in result.counts.items() if k in MUST_BE_ZERO and v} } "
                f"{result.notes}; files and diagnosis.txt in {kept}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return row


def failures(row: dict[str, Any]) -> list[str]:
    """What is wrong in one table row (empty: the configuration passed)."""
    wrong = [f"{k} {row[k]}" for k in MUST_BE_ZERO if row.get(k)]
    return wrong + row["notes"]


def quick_configs() -> list[Config]:
    """A short slice: every configuration once, at a tenth of the size."""
    return [Config(c.mode, c.work.scaled(0.1), 1) for c in CONFIGS]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="every configuration once at a tenth of its size (~0.6M faults, ~2 min)")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="only configurations whose name contains TEXT (repeatable)")
    parser.add_argument("--mode", choices=("full", "light"), help="only this tracer mode")
    parser.add_argument("--runs", type=int, help="runs per configuration (default: its own)")
    parser.add_argument("--keep", type=Path, default=KEEP_DIR,
                        help=f"where failing runs' files go (default {KEEP_DIR})")
    parser.add_argument("--workdir", type=Path, default=Path("/dev/shm"),
                        help="where runs write their CSVs (default /dev/shm)")
    args = parser.parse_args(argv)

    configs = quick_configs() if args.quick else CONFIGS
    if args.only:
        configs = [c for c in configs if any(t in c.name for t in args.only)]
    if args.mode:
        configs = [c for c in configs if c.mode == args.mode]
    if args.runs:
        configs = [Config(c.mode, c.work, args.runs) for c in configs]
    print(f"load average {os.getloadavg()[0]:.2f}; {len(configs)} configurations, unpinned on "
          f"{os.cpu_count()} CPUs", flush=True)
    t0 = time.monotonic()
    table = []
    for cfg in configs:
        row = run_config(cfg, args.workdir, args.keep)
        table.append(row)
        print(f"stress: {row['name']} ({row['mode']}): "
              + ", ".join(f"{k} {row[k]}" for k in COUNTS if row[k] is not None)
              + f", {row['wall_s']:.0f} s" + (f"  FAILED: {failures(row)}" if failures(row) else ""),
              flush=True)
    total = {"name": "total", "mode": "", "runs": sum(r["runs"] for r in table),
             "wall_s": sum(r["wall_s"] for r in table)}
    for key in COUNTS:
        values = [r[key] for r in table if r[key] is not None]
        total[key] = sum(values) if values else None
    print("\n" + format_table([*table, total], COLUMNS))
    print(f"\n{total['faults']:,} ground-truth faults in {time.monotonic() - t0:.0f} s")
    bad = [(r, failures(r)) for r in table if failures(r)]
    for r, what in bad:
        print(f"FAILED {r['name']} ({r['mode']}): {'; '.join(map(str, what))}"
              + (f"; files: {' '.join(r['kept'])}" if r["kept"] else ""))
    if not args.quick and not args.only and not args.mode and total["faults"] < TARGET_FAULTS:
        print(f"MISSED: fewer than {TARGET_FAULTS:,} faults")
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
