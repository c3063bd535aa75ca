"""The kernel's own userfaultfd selftest as a foreign workload (issue #12, requirement 3).

`uffdtrace record` traces Linux 6.1's `tools/testing/selftests/vm/userfaultfd` (built by
`scripts/setup.sh`), a handler written by others: no UFFD_FEATURE_THREAD_ID, CONTINUE twice
per page (the second returns EEXIST on purpose), a new uffd per phase with the fd numbers
reused, a forked child per events test. bpftrace (`foreign_count.bt`) counts the same
process's ioctls alongside, and the selftest prints its own fault counts. We hold the
recording against both; see `test_selftest` for what is compared and how.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.foreign import (
    UFFD_EVENT_NAMES,
    UFFDIO_REGISTER_MODE_MINOR,
    IoctlCounter,
    minor_phase_rows,
    parse_selftest_output,
    result_class,
    selftest_args,
    selftest_binary,
)
from uffdtrace.events import FAULT_COLUMNS

pytestmark = [pytest.mark.root]

UFFDTRACE = [sys.executable, "-m", "uffdtrace"]
# (MiB, bounces): shmem makes 4096 minor faults of 4 KiB, hugetlb_shared 64 of 2 MiB; each run
# is about 1 s untraced, 6-10 s traced (BCC compile included).
SIZES = {"shmem": (16, 4), "hugetlb_shared": (128, 4)}


def record_selftest(tmp: Path, mode: str, memory: str) -> tuple:
    """Run the selftest under `record` with bpftrace alongside. Returns (rows, record summary,
    per-ioctl rows of `record --ioctls` (full mode; else None), selftest output, bpftrace's
    count)."""
    binary = selftest_binary()
    rec_csv, ioctls_csv, out_txt = tmp / "rec.csv", tmp / "ioctls.csv", tmp / "selftest.out"
    mib, bounces = SIZES[memory]
    ioctls_arg = ["--ioctls", str(ioctls_csv)] if mode == "full" else []
    with selftest_args(memory, mib, bounces, tmp) as args, IoctlCounter() as counter:
        # The selftest's stdout goes to a file (record's stdout is the JSON summary); `exec`
        # keeps the traced process the selftest itself.
        workload = f"exec {shlex.join([str(binary), *args])} > {shlex.quote(str(out_txt))}"
        out = subprocess.run(
            [*UFFDTRACE, "record", "--mode", mode, "-o", str(rec_csv), *ioctls_arg, "--json",
             "--", "sh", "-c", workload],
            capture_output=True, text=True, timeout=120)
    # Kept beside the CSVs for a look after a failure: the registrations select the minor phase.
    (tmp / "bpftrace.json").write_text(json.dumps({
        "registers": [vars(r) for r in counter.result.registers],
        "ioctls": [[op, res, n] for (op, res), n in sorted(counter.result.ioctls.items())]}))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    text = out_txt.read_text()
    assert summary["command_exit"] == 0, (out.stderr, text)
    rows = pd.read_csv(rec_csv)
    assert list(rows.columns) == list(FAULT_COLUMNS)
    ioctls = pd.read_csv(ioctls_csv) if ioctls_arg else None
    return rows, summary, ioctls, parse_selftest_output(text), counter.result


@pytest.mark.parametrize("memory", ["shmem", "hugetlb_shared"])
@pytest.mark.parametrize("mode", ["full", "light"])
@pytest.mark.hugepages
def test_selftest(tmp_path, no_leaks, mode, memory):
    """The selftest's minor faults, its CONTINUEs, and what must not be in the recording.

    Which rows are the minor faults: the selftest makes minor faults only in its last phase
    ("testing minor faults"), in the one range it registers UFFDIO_REGISTER_MODE_MINOR
    (`area_dst_alias`), from its main thread; no other range of it is MINOR-registered.
    bpftrace reports every UFFDIO_REGISTER (pid, range, mode, exit time in CLOCK_MONOTONIC ns,
    the clock of the rows), so the minor-phase rows are those of that pid inside that range
    and after that registration returned (and before the pid's next registration, if any).
    The time bound matters: each phase maps its areas anew, often at an earlier phase's
    addresses, where that phase had missing and wp faults. This selection does not use the
    row's `kind`, which light mode may leave empty; the kind is then checked on its own:
    every selected row is `minor` (or empty, in light mode), and no row outside is `minor`.

    Checked, all of them, then reported together:
    - the minor-phase rows equal the selftest's own `userfaults: N minor` count;
    - (full) CONTINUE ioctls by result (ok / EEXIST / other) equal bpftrace's count, both
      in the summary's `ioctls` and in the per-ioctl CSV of `record --ioctls`;
    - no row resolved by CONTINUE carries errno EEXIST: the selftest's second CONTINUE on the
      page fails on purpose after the fault was resolved, and is not the fault's;
    - no lost records, the command exits 0;
    - `uffd_events` holds only real uffd events (no messages decoded from ordinary reads).
    """
    rows, summary, ioctl_rows, selftest, counted = record_selftest(tmp_path, mode, memory)
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)

    # the selftest's own run, and bpftrace's count of it: two CONTINUEs per minor fault, the
    # second failing with EEXIST (so bpftrace was attached from the start)
    minor_phase = [p for p in selftest.phases if p.phase == "testing minor faults"]
    assert len(minor_phase) == 1 and minor_phase[0].minor == selftest.nr_pages, selftest
    theirs = counted.by_result("CONTINUE")
    assert theirs == {"EEXIST": selftest.minor, "ok": selftest.minor}, counted.ioctls

    # minor faults
    minor_regs = [r for r in counted.registers if r.ret == 0 and r.mode & UFFDIO_REGISTER_MODE_MINOR]
    assert len(minor_regs) == 1, counted.registers
    selected = minor_phase_rows(rows, counted.registers)
    kinds = selected["kind"].value_counts(dropna=False).to_dict()
    outside = rows[(rows["kind"] == "minor") & ~rows.index.isin(selected.index)]
    check(len(selected) == selftest.minor,
          f"minor-phase rows: ours {len(selected)} != selftest's {selftest.minor} "
          f"(kinds {kinds}, outcomes {selected['outcome'].value_counts().to_dict()})")
    kind = selected["kind"]
    wrong_kind = selected[(kind.notna() & (kind != "minor")) | (kind.isna() & (mode == "full"))]
    check(wrong_kind.empty, f"minor-phase rows not of kind minor: {kinds}")
    check(outside.empty, f"{len(outside)} rows of kind minor outside the minor phase "
          f"(pids {outside['pid'].value_counts().to_dict()})")

    # CONTINUE: ours against bpftrace's
    ours: dict[str, int] = {}
    for io in summary["ioctls"]:
        if io["ioctl"] == "CONTINUE":
            res = result_class(io["errno"])
            ours[res] = ours.get(res, 0) + io["count"]
    per_ioctl: dict[str, int] = {}
    if mode == "full":
        check(ours == theirs, f"CONTINUE by result (summary): ours {ours} != bpftrace's {theirs}")
        cont = ioctl_rows[ioctl_rows["ioctl"] == "CONTINUE"]
        per_ioctl = cont["errno"].map(result_class).value_counts().to_dict()
        check(per_ioctl == theirs,
              f"CONTINUE by result (--ioctls CSV): ours {per_ioctl} != bpftrace's {theirs}")

    # the second, failing CONTINUE charged to the resolved fault
    charged = rows[(rows["outcome"] == "resolved") & (rows["resolver"] == "CONTINUE")
                   & (rows["errno"] == 17)]
    check(charged.empty, f"{len(charged)} rows resolved by CONTINUE with errno 17 (EEXIST)")

    check(summary["lost_total"] == 0, f"lost records: {summary['lost']}")
    bogus = [e for e in summary["uffd_events"] if e["event"] not in UFFD_EVENT_NAMES]
    check(not bogus, f"uffd_events not from a uffd: {bogus} (of {summary['uffd_events']})")

    numbers = {
        "mode": mode, "memory": memory, "selftest_minor": selftest.minor,
        "selftest_missing": selftest.missing, "selftest_wp": selftest.wp,
        "rows": len(rows), "minor_phase_rows": len(selected), "minor_phase_kinds": kinds,
        "kind_minor_rows": int((rows["kind"] == "minor").sum()),
        "continue_ours": ours, "continue_ioctls_csv": per_ioctl, "continue_bpftrace": theirs,
        "ioctls_bpftrace": {f"{op} {res}": n for (op, res), n in sorted(counted.ioctls.items())},
        "resolved_continue_eexist_rows": len(charged), "lost_total": summary["lost_total"],
        "uffd_events": summary["uffd_events"], "by_backing_kind": summary["by_backing_kind"],
    }
    print("foreign:", json.dumps(numbers, default=str))
    assert not failures, "\n".join([*failures, json.dumps(numbers, default=str)])
