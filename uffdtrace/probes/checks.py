"""The checks of this machine, each made by doing the real thing: import BCC, compile and
load a tiny program of each BPF feature, attach each tracepoint, read kallsyms, take a real
one-page minor fault. Each returns `Check`s, never raises: a failure carries its reason and a
concrete fix. `uffdtrace.probes.capabilities` runs them and decides what can trace here.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from uffdtrace.errors import UserError
from uffdtrace.probes import hooks, tracepoint
from uffdtrace.probes.kernel import hidden_symbols

T = TypeVar("T")

SECTIONS = ("system", "bpf", "tracepoints", "symbols", "hooks", "userfaultfd")  # display order

TRACEPOINTS = tuple(tracepoint.TRACEPOINTS)  # every tracepoint any backend attaches, in any mode
# Kernel functions of the userfaultfd paths (names vary across kernels: docs/design.md, 'Renamed
# userfaultfd internals'): the kprobe backend's hook candidates, and a few more that explain a
# kernel's userfaultfd.
KERNEL_SYMBOLS = (
    *hooks.SYMBOLS,
    "userfaultfd_read",
    "userfaultfd_read_iter",
    "__wake_userfault",
    "userfaultfd_wake_function",
    "mfill_atomic_install_pte",
    "__mcopy_atomic",
)
KERNEL_SYMBOLS = tuple(dict.fromkeys(KERNEL_SYMBOLS))

FIX_ROOT = "run as root: loading BPF, kallsyms addresses and hugepages need it"
FIX_BCC = ("apt-get install python3-bpfcc, and run from a venv made with "
           "--system-site-packages (bash scripts/setup.sh); PyPI's 'bcc' is unrelated")
FIX_HEADERS = "bash scripts/setup.sh (installs and links Debian's linux-headers-amd64)"
FIX_TRACEFS = "mount -t tracefs nodev /sys/kernel/tracing"
FIX_KPROBES = "kprobes need a kernel with CONFIG_KPROBES: the tracepoint backend is used instead"
FIX_FENTRY = ("fentry needs BPF trampolines (BPF_PROG_TYPE_TRACING): not needed, "
              "the tracepoint backend is used instead")

# Tiny programs for the BPF feature checks, keyed by the check each one decides. All are
# compiled as one BPF() object (one clang run); only if that fails, one by one to tell which.
# One function per program type: BCC caches loaded functions by name, whatever their type.
_PROGRAMS = {
    "bcc-compile": """
int uffdtrace_raw(void *ctx) { return 0; }
int uffdtrace_tp(void *ctx) { return 0; }
int uffdtrace_kprobe(void *ctx) { return 0; }
""",
    "ringbuf": """
BPF_RINGBUF_OUTPUT(uffdtrace_rb, 1);
int uffdtrace_ringbuf(void *ctx) {
    u32 v = 0;
    uffdtrace_rb.ringbuf_output(&v, sizeof(v), 0);
    return 0;
}
""",
    "stack-traces": """
BPF_STACK_TRACE(uffdtrace_stacks, 16);
int uffdtrace_stack(void *ctx) {
    u64 ips[4];
    uffdtrace_stacks.get_stackid(ctx, 0);
    bpf_get_stack(ctx, ips, sizeof(ips), 0);
    return 0;
}
""",
}


@dataclass(frozen=True)
class Check:
    """One capability: found or not, what was found, and how to fix it when missing."""

    name: str
    section: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class HugePages:
    """Default-size hugetlb pages, from /proc/meminfo."""

    size_kb: int
    total: int
    free: int
    reservable: bool  # /proc/sys/vm/nr_hugepages is writable: runs reserve pages themselves


def attempt(action: Callable[[], T]) -> tuple[T | None, str]:
    """Run `action` with fd 2 captured (libbcc, libbpf and clang write there) and BCC's
    str-vs-bytes deprecation warnings silenced.

    Returns (result, "") on success, (None, why it failed) otherwise.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="bcc")
        os.dup2(captured.fileno(), 2)
        try:
            return action(), ""
        except Exception as e:
            error = e
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        noise = captured.read().decode(errors="replace")
    return None, _reason(error, noise)


def _reason(error: Exception, noise: str) -> str:
    """The exception's message, plus the most telling line the C libraries printed."""
    message = str(error) or type(error).__name__
    if type(error) not in (Exception, UserError):
        message = f"{type(error).__name__}: {message}"
    lines = [line.strip() for line in noise.splitlines() if line.strip()]
    telling = [line for line in lines if re.search(r"error|fail", line, re.IGNORECASE)]
    line = telling[0] if telling else lines[-1] if lines else ""
    if line and line not in message:
        message += f" [{line}]"
    return message


def import_bcc() -> tuple[Any, Check]:
    bcc, err = attempt(lambda: importlib.import_module("bcc"))
    if bcc is None:
        return None, Check("bcc", "system", False, f"cannot import bcc ({err})", FIX_BCC)
    if not hasattr(bcc, "BPF"):
        detail = f"the 'bcc' module at {bcc.__file__} is not BCC"
        return None, Check("bcc", "system", False, detail, FIX_BCC)
    version = getattr(bcc, "__version__", "unknown")
    return bcc, Check("bcc", "system", True, f"BCC {version} ({Path(bcc.__file__).parent})")


def check_headers(release: str) -> Check:
    """BCC compiles against /lib/modules/<release>/build: own headers, a fallback, or none."""
    build = Path("/lib/modules", release, "build")
    fix = f"{FIX_HEADERS}, or apt-get install linux-headers-{release}"
    if not build.exists():
        return Check("kernel-headers", "system", False, f"{build} does not exist", fix)
    if not any((build.parent / d / "include/linux/kconfig.h").exists()
               for d in ("build", "source")):
        detail = f"{build} has no include/linux/kconfig.h (nor has ../source)"
        return Check("kernel-headers", "system", False, detail, fix)
    uts, _ = attempt((build / "include/generated/utsrelease.h").read_text)
    found = re.search(r'"(.+)"', uts or "")
    version = found.group(1) if found else "unknown version"
    if version == release:
        return Check("kernel-headers", "system", True, f"{build} (the running kernel's)")
    # Enough for uffdtrace: headers give only struct pt_regs and BCC's helpers; struct offsets
# come from BTF (docs/design.md, 'What comes from the running kernel').
    return Check("kernel-headers", "system", True,
                 f"fallback to {version} headers ({build.resolve()})")


def find_tracefs() -> tuple[Path | None, Check]:
    """The first tracefs mount with events/, from /proc/self/mounts."""
    with open("/proc/self/mounts") as f:
        mounts = [Path(fields[1]) for fields in map(str.split, f) if fields[2] == "tracefs"]
    if not mounts:
        return None, Check("tracefs", "system", False, "not mounted", FIX_TRACEFS)
    readable = [m for m in mounts if os.access(m, os.R_OK | os.X_OK)]
    if not readable:
        detail = f"{mounts[0]} is not readable by uid {os.geteuid()}"
        return None, Check("tracefs", "system", False, detail, FIX_ROOT)
    usable = [m for m in readable if (m / "events").is_dir()]
    if not usable:
        detail = f"{readable[0]} has no events/"
        return None, Check("tracefs", "system", False, detail, FIX_TRACEFS)
    detail = "mounted at " + ", ".join(map(str, usable))
    return usable[0], Check("tracefs", "system", True, detail)


def probe_bpf(
    bcc: Any, tracefs: Path | None, tracefs_check: Check
) -> tuple[list[Check], float | None]:
    """Compile and load the tiny programs, attach them to each tracepoint and to a kprobe,
    and detach everything again. Also returns the compile time (ms)."""
    if bcc is None:
        return _untested("not tested: BCC is not importable", FIX_BCC), None
    loaded: list[Any] = []
    try:
        owners, errors, compile_ms = _compile_programs(bcc.BPF, loaded)
        base = owners.get("bcc-compile")
        if base is None:
            reason = f"a trivial BCC program does not compile: {errors['bcc-compile']}"
            return _untested(reason, FIX_HEADERS), None
        return [
            Check("bcc-compile", "bpf", True, f"trivial program compiled in {compile_ms:.0f} ms"),
            *_probe_tracepoints(bcc.BPF, base, tracefs, tracefs_check),
            _load_check("ringbuf", "BPF_RINGBUF_OUTPUT program", owners, errors, bcc.BPF,
                        "uffdtrace_ringbuf", "the BPF ring buffer needs Linux 5.8+"),
            _load_check("stack-traces", "stack map + bpf_get_stack program", owners, errors,
                        bcc.BPF, "uffdtrace_stack", "bpf_get_stack needs Linux 4.18+"),
            _probe_kprobe(base, tracefs),
            _probe_fentry(bcc.BPF, loaded),
        ], compile_ms
    finally:
        for bpf in loaded:
            attempt(bpf.cleanup)


def _untested(reason: str, fix: str) -> list[Check]:
    """Every BPF and tracepoint check, failed for one common reason."""
    bpf = ("bcc-compile", "raw-tracepoints", "tracepoint-programs", "ringbuf", "stack-traces",
           "kprobes", "fentry")
    return [Check(name, "bpf", False, reason, fix) for name in bpf] + [
        Check(tp, "tracepoints", False, reason, fix) for tp in TRACEPOINTS]


def _compile_programs(
    bpf_class: Any, loaded: list[Any]
) -> tuple[dict[str, Any], dict[str, str], float]:
    """Compile _PROGRAMS together, or one by one if that fails. Returns check name -> the BPF
    object holding its program, check name -> compile error, and the compile time (ms)
    of the one object that holds the trivial program."""
    start = time.monotonic()
    together, _ = attempt(lambda: bpf_class(text="".join(_PROGRAMS.values())))
    if together is not None:
        loaded.append(together)
        return dict.fromkeys(_PROGRAMS, together), {}, (time.monotonic() - start) * 1e3
    owners, errors, compile_ms = {}, {}, 0.0
    for name, source in _PROGRAMS.items():
        start = time.monotonic()
        bpf, error = attempt(lambda source=source: bpf_class(text=source))
        if bpf is None:
            errors[name] = error
            continue
        loaded.append(bpf)
        owners[name] = bpf
        if name == "bcc-compile":
            compile_ms = (time.monotonic() - start) * 1e3
    return owners, errors, compile_ms


def _load_check(name: str, what: str, owners: dict[str, Any], errors: dict[str, str],
                bpf_class: Any, function: str, fix: str) -> Check:
    """Load (verify) one program that uses a map type and its helpers."""
    if name not in owners:
        return Check(name, "bpf", False, f"{what} does not compile or its map cannot be "
                     f"created: {errors[name]}", fix)
    _, err = attempt(lambda: owners[name].load_func(function, bpf_class.TRACEPOINT))
    if err:
        return Check(name, "bpf", False, f"{what} rejected by the kernel: {err}", fix)
    return Check(name, "bpf", True, f"{what} loaded")


def _probe_tracepoints(
    bpf_class: Any, base: Any, tracefs: Path | None, tracefs_check: Check
) -> list[Check]:
    """The raw-tracepoints and tracepoint-programs checks, then one check per tracepoint:
    its format in tracefs, and a raw tracepoint program attached to it (a tracepoint
    program for the syscalls:* events, which have no raw tracepoint)."""
    raw_fn, tp_fn = "uffdtrace_raw", "uffdtrace_tp"
    _, raw_err = attempt(lambda: base.load_func(raw_fn, bpf_class.RAW_TRACEPOINT))
    _, tp_err = attempt(lambda: base.attach_tracepoint(tp="sched:sched_switch", fn_name=tp_fn))
    raw_attached = 0
    checks = []
    for tp in TRACEPOINTS:
        category, event = tp.split(":")
        fix = f"this kernel lacks the {tp} tracepoint"
        if tracefs is None:
            checks.append(Check(tp, "tracepoints", False,
                                f"not tested: tracefs {tracefs_check.detail}", tracefs_check.fix))
            continue
        if not (tracefs / "events" / category / event / "format").exists():
            detail = f"no events/{category}/{event}/format in {tracefs}"
            checks.append(Check(tp, "tracepoints", False, detail, fix))
            continue
        if category == "syscalls":
            how = "tracepoint program attached"
            _, err = attempt(lambda tp=tp: base.attach_tracepoint(tp=tp, fn_name=tp_fn))
        else:
            how = "raw tracepoint attached"
            _, err = attempt(
                lambda event=event: base.attach_raw_tracepoint(tp=event, fn_name=raw_fn))
            raw_attached += not err
        if err:
            checks.append(Check(tp, "tracepoints", False, f"format present; {err}", fix))
        else:
            checks.append(Check(tp, "tracepoints", True, f"format present, {how}"))

    raw_total = sum(not tp.startswith("syscalls:") for tp in TRACEPOINTS)
    if raw_err or not raw_attached:
        raw = Check("raw-tracepoints", "bpf", False, raw_err or "attached to none",
                    "raw tracepoints need Linux 4.17+ with CONFIG_BPF_EVENTS")
    else:
        raw = Check("raw-tracepoints", "bpf", True,
                    f"program loaded, attached to {raw_attached} of {raw_total}")
    if tp_err:
        tp_check = Check("tracepoint-programs", "bpf", False,
                         f"attach to sched:sched_switch failed: {tp_err}",
                         "tracepoint programs need CONFIG_BPF_EVENTS and a mounted tracefs")
    else:
        tp_check = Check("tracepoint-programs", "bpf", True,
                         "program loaded and attached to sched:sched_switch")
    return [raw, tp_check, *checks]


def _probe_kprobe(base: Any, tracefs: Path | None) -> Check:
    """Attach a kprobe to handle_userfault; explain a failure with what the kernel lacks."""
    _, err = attempt(
        lambda: base.attach_kprobe(event="handle_userfault", fn_name="uffdtrace_kprobe"))
    if not err:
        return Check("kprobes", "bpf", True, "kprobe attached to handle_userfault")
    lacks = []
    if not Path("/sys/bus/event_source/devices/kprobe").exists():
        lacks.append("no kprobe PMU in /sys/bus/event_source/devices")
    if tracefs is not None and not (tracefs / "kprobe_events").exists():
        lacks.append(f"no kprobe_events in {tracefs}")
    # BCC blames the symbol ("not traceable"); when the kernel has no kprobe support at all,
    # say that instead.
    why = f"this kernel has {' and '.join(lacks)}" if lacks else err
    return Check("kprobes", "bpf", False, f"attach to handle_userfault failed: {why}",
                 FIX_KPROBES)


def _probe_fentry(bpf_class: Any, loaded: list[Any]) -> Check:
    """Load a KFUNC_PROBE: BPF.support_kfunc() only looks for a kernel symbol."""
    claims, _ = attempt(bpf_class.support_kfunc)
    bpf, err = attempt(lambda: bpf_class(text="KFUNC_PROBE(handle_userfault) { return 0; }"))
    if bpf is None:
        claim = " (BPF.support_kfunc() wrongly says yes)" if claims else ""
        return Check("fentry", "bpf", False,
                     f"KFUNC_PROBE(handle_userfault) refused{claim}: {err}", FIX_FENTRY)
    loaded.append(bpf)
    return Check("fentry", "bpf", True, "KFUNC_PROBE(handle_userfault) loaded and attached")


def check_bpf_stats() -> Check:
    """Take and drop BPF_ENABLE_STATS's fd, as a session holds it for its run."""
    def take_and_drop() -> None:
        from uffdtrace.probes.bpfstats import stats_fd

        os.close(stats_fd())

    _, err = attempt(take_and_drop)
    if err:
        return Check("bpf-stats", "bpf", False, err, "run as root (BPF_ENABLE_STATS needs CAP_SYS_ADMIN)")
    return Check("bpf-stats", "bpf", True, "BPF_ENABLE_STATS accepted: run-time stats while a session runs")


def probe_kallsyms() -> tuple[dict[str, int], list[Check]]:
    """Which KERNEL_SYMBOLS /proc/kallsyms lists, and whether its addresses are real."""
    wanted = set(KERNEL_SYMBOLS) - hidden_symbols()
    symbols: dict[str, int] = {}
    real = False

    def scan() -> None:
        nonlocal real
        with open("/proc/kallsyms") as f:
            for line in f:
                addr, _, name = line.split(maxsplit=3)[:3]
                real = real or int(addr, 16) != 0
                if name in wanted:
                    symbols.setdefault(name, int(addr, 16))

    _, err = attempt(scan)
    if err:
        checks = [Check("kallsyms", "symbols", False, err, FIX_ROOT)]
    elif not real:
        checks = [Check("kallsyms", "symbols", False, "readable, but every address is 0",
                        f"{FIX_ROOT} (kernel.kptr_restrict hides addresses from others)")]
    else:
        checks = [Check("kallsyms", "symbols", True,
                        f"real addresses; {len(symbols)} of {len(KERNEL_SYMBOLS)} "
                        "userfaultfd symbols present")]
    for name in KERNEL_SYMBOLS:
        if name in symbols:
            addr = symbols[name]
            checks.append(Check(name, "symbols", True, f"{addr:#x}" if addr else "present"))
        else:
            checks.append(Check(name, "symbols", False, "absent (renamed, or inlined)"))
    return {name: symbols[name] for name in KERNEL_SYMBOLS if name in symbols}, checks


def resolve_hooks(symbols: dict[str, int]) -> list[Check]:
    """Which symbol each kprobe hook would attach to here (uffdtrace.probes.hooks)."""
    checks = []
    resolved = hooks.resolve(symbols)
    for hook in hooks.HOOKS:
        symbol = resolved[hook.name]
        if symbol:
            checks.append(Check(f"hook:{hook.name}", "hooks", True, symbol))
        else:
            effect = "the kprobe backend cannot run" if hook.required else "left to the tracepoints"
            checks.append(Check(f"hook:{hook.name}", "hooks", False,
                                f"none of {', '.join(hook.symbols)} here: {effect} ({hook.gives})",
                                "renamed or inlined here: add this kernel's name to "
                                "uffdtrace/probes/hooks.py"))
    return checks


def probe_minor_fault(backing: str) -> Check:
    """One real minor fault on `backing`, resolved by UFFDIO_CONTINUE, via the exerciser."""
    name = f"{backing}-minor"
    if backing == "shmem":
        fix = "needs Linux 5.14+ with CONFIG_USERFAULTFD (UFFD_FEATURE_MINOR_SHMEM)"
    else:
        fix = ("needs Linux 5.13+ with CONFIG_USERFAULTFD and CONFIG_HUGETLBFS "
               "(UFFD_FEATURE_MINOR_HUGETLBFS), and root to reserve a hugepage")

    def import_exerciser() -> tuple[Any, Callable[..., Any]]:
        from uffdtrace.exerciser import ExerciseConfig, run

        return ExerciseConfig, run

    exerciser, err = attempt(import_exerciser)
    if exerciser is None:
        return Check(name, "userfaultfd", False, f"exerciser not importable: {err}",
                     "bash scripts/setup.sh (builds the cffi exerciser)")
    config_class, run = exerciser

    def one_fault() -> int:
        config = config_class(backing=backing, kind="minor", pages=1, threads=1,
                              handler_threads=1)
        return run(config).summary["faults"]

    start = time.monotonic()
    faults, err = attempt(one_fault)
    ms = (time.monotonic() - start) * 1e3
    if err:
        return Check(name, "userfaultfd", False, err, fix)
    if faults != 1:
        return Check(name, "userfaultfd", False, f"1 page touched but {faults} faults seen", fix)
    return Check(name, "userfaultfd", True,
                 f"1 minor fault made and resolved (exerciser run: {ms:.0f} ms)")


def read_hugepages() -> HugePages | None:
    with open("/proc/meminfo") as f:
        info = dict(re.findall(r"^(\w+):\s+(\d+)", f.read(), re.MULTILINE))
    if "Hugepagesize" not in info:
        return None
    return HugePages(
        size_kb=int(info["Hugepagesize"]),
        total=int(info["HugePages_Total"]),
        free=int(info["HugePages_Free"]),
        reservable=os.access("/proc/sys/vm/nr_hugepages", os.W_OK),
    )


def check_hugepages(pages: HugePages | None) -> Check:
    if pages is None:
        return Check("hugepages", "userfaultfd", False, "no Hugepagesize in /proc/meminfo",
                     "needs a kernel with CONFIG_HUGETLBFS")
    reserve = "runs reserve their own" if pages.reservable else "nr_hugepages read-only"
    detail = f"{pages.size_kb} kB pages: {pages.total} in pool, {pages.free} free; {reserve}"
    return Check("hugepages", "userfaultfd", pages.free > 0 or pages.reservable, detail,
                 "run as root, or reserve pages beforehand: echo 4 > /proc/sys/vm/nr_hugepages")
