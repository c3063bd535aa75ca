"""Capability detection on the real kernel (root, BCC, 6.18 without kprobes), and backend
choice on real and on edited findings."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from uffdtrace.errors import UserError
from uffdtrace.probes import capabilities as cap
from uffdtrace.probes import checks
from uffdtrace.probes.tracepoint import TracepointBackend, TraceScope

pytestmark = [pytest.mark.root, pytest.mark.hugepages]

NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def bpf_fds() -> list[str]:
    """This process's open BPF objects and perf events."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the fd of the listing itself
            continue
    return sorted(link for link in links if "bpf" in link or "perf_event" in link)


@dataclasses.dataclass
class Probed:
    caps: cap.Capabilities
    fds_before: list[str]
    fds_after: list[str]
    hugepages_before: str
    hugepages_after: str


@pytest.fixture(scope="module")
def probed() -> Probed:
    """One fresh detection, with what it might leave behind measured around it."""
    cap.detect.cache_clear()
    fds_before, hugepages_before = bpf_fds(), NR_HUGEPAGES.read_text()
    caps = cap.detect()
    return Probed(caps, fds_before, bpf_fds(), hugepages_before, NR_HUGEPAGES.read_text())


@pytest.fixture
def caps(probed: Probed) -> cap.Capabilities:
    return probed.caps


def edited(caps: cap.Capabilities, ok: dict[str, bool]) -> cap.Capabilities:
    """`caps` with some checks forced to pass or fail."""
    assert set(ok) <= {c.name for c in caps.checks}
    checks = tuple(dataclasses.replace(c, ok=ok.get(c.name, c.ok)) for c in caps.checks)
    return dataclasses.replace(caps, checks=checks)


def test_detect_is_quick_leaves_nothing_loaded_and_restores_hugepages(probed: Probed) -> None:
    assert probed.caps.elapsed_s < 5
    assert probed.fds_after == probed.fds_before
    assert probed.hugepages_after == probed.hugepages_before


def test_detect_is_cached(caps: cap.Capabilities) -> None:
    assert cap.detect() is caps


def test_system(caps: cap.Capabilities) -> None:
    import bcc

    assert caps.kernel == os.uname().release
    assert caps.root is True
    assert caps.bcc_version == bcc.__version__
    assert caps.compile_ms is not None and 0 < caps.compile_ms < 3000
    for name in ("root", "bcc", "bcc-compile", "kernel-headers", "tracefs"):
        assert caps.ok(name), caps.check(name)
    uts = Path("/lib/modules", caps.kernel, "build/include/generated/utsrelease.h").read_text()
    fallback = f'"{caps.kernel}"' not in uts
    assert ("fallback" in caps.check("kernel-headers").detail) == fallback


def test_bpf_features_load(caps: cap.Capabilities) -> None:
    for name in ("raw-tracepoints", "tracepoint-programs", "ringbuf", "stack-traces",
                 "bpf-stats"):
        assert caps.ok(name), caps.check(name)


def test_kprobes_and_fentry_as_this_kernel_has_them(caps: cap.Capabilities) -> None:
    """Held against independent evidence, so the test holds on kernels with and without them:
    the kprobe PMU, and bpftool's probe of the `tracing` program type (fentry/fexit)."""
    kprobes, fentry = caps.check("kprobes"), caps.check("fentry")
    assert kprobes.ok == Path("/sys/bus/event_source/devices/kprobe").exists(), kprobes
    if not kprobes.ok:
        assert "handle_userfault" in kprobes.detail
        assert "CONFIG_KPROBES" in kprobes.fix and "tracepoint backend" in kprobes.fix
    probe = subprocess.run(["bpftool", "feature", "probe", "kernel"], capture_output=True,
                           text=True, check=True).stdout
    assert fentry.ok == ("eBPF program_type tracing is available" in probe), fentry
    if not fentry.ok:
        assert "KFUNC_PROBE" in fentry.detail and fentry.fix


def test_every_needed_tracepoint_is_attached(caps: cap.Capabilities) -> None:
    for tp in cap.TRACEPOINTS:
        check = caps.check(tp)
        assert check.ok, check
        assert "raw tracepoint attached" in check.detail


@pytest.mark.parametrize("mode", cap.MODES)
def test_doctor_checks_what_the_backend_attaches(mode: str) -> None:
    """The tracepoints the backend says it attaches (doctor checks those) are the ones BCC
    attached, mode by mode."""
    backend = TracepointBackend(mode, TraceScope())
    try:
        backend.start()
        attached = set(backend.raw_tracepoints())
    finally:
        backend.close()
    listed = [tp for tp in TracepointBackend.tracepoints(mode)
              if Path("/sys/kernel/tracing/events", *tp.split(":")).exists()]
    assert attached == {tp.split(":")[1] for tp in listed}
    assert set(listed) <= set(cap.TRACEPOINTS)  # doctor checks every one


def test_symbols_match_kallsyms(caps: cap.Capabilities) -> None:
    with open("/proc/kallsyms") as f:
        kallsyms = {}
        for line in f:
            addr, _, name = line.split()[:3]
            kallsyms.setdefault(name, int(addr, 16))
    assert caps.ok("kallsyms")
    for name in cap.KERNEL_SYMBOLS:
        assert caps.ok(name) == (name in kallsyms)
        assert caps.symbols.get(name) == kallsyms.get(name)
    assert caps.symbols["handle_userfault"] and caps.symbols["hugetlb_fault"]


def test_real_minor_faults_on_shmem_and_hugetlb(caps: cap.Capabilities) -> None:
    for name in ("shmem-minor", "hugetlb-minor", "hugepages"):
        assert caps.ok(name), caps.check(name)
    assert caps.hugepages is not None and caps.hugepages.reservable
    assert caps.hugepages.size_kb == 2048


def test_every_failure_has_a_fix(caps: cap.Capabilities) -> None:
    for check in caps.checks:
        assert check.detail
        assert check.ok or check.fix or check.name in cap.KERNEL_SYMBOLS, check


def test_backend_choice_here(caps: cap.Capabilities) -> None:
    assert cap.tracing_possible(caps)
    assert cap.choose_backend("auto", caps) == "tracepoint"
    assert cap.choose_backend("tracepoint", caps) == "tracepoint"
    assert cap.available_modes(caps, "tracepoint") == ["light", "full"]
    with pytest.raises(UserError, match=r"kprobe backend cannot run here: kprobes missing.*"
                                        r"`auto` would use the tracepoint backend"):
        cap.choose_backend("kprobe", caps)
    with pytest.raises(UserError, match="unknown backend 'ebpf'"):
        cap.choose_backend("ebpf", caps)


def test_auto_prefers_kprobes_where_they_work(caps: cap.Capabilities) -> None:
    assert cap.choose_backend("auto", edited(caps, {"kprobes": True})) == "kprobe"
    no_symbol = edited(caps, {"kprobes": True, "handle_userfault": False})
    assert cap.choose_backend("auto", no_symbol) == "tracepoint"


def test_modes_need_their_syscall_tracepoints(caps: cap.Capabilities) -> None:
    """Full mode's ioctls need sys_enter; the tracepoint backend reads messages at sys_exit in
    both modes, while the kprobe backend's light mode needs no syscall tracepoint."""
    light_only = edited(caps, {"raw_syscalls:sys_enter": False})
    assert cap.available_modes(light_only, "tracepoint") == ["light"]
    assert cap.choose_backend("auto", light_only) == "tracepoint"
    no_exit = edited(caps, {"raw_syscalls:sys_exit": False, "kprobes": True})
    assert cap.available_modes(no_exit, "tracepoint") == []
    assert cap.available_modes(no_exit, "kprobe") == ["light"]


def test_impossible_without_root_or_raw_tracepoints(caps: cap.Capabilities) -> None:
    for broken in (edited(caps, {"root": False}), edited(caps, {"raw-tracepoints": False})):
        assert not cap.tracing_possible(broken)
        with pytest.raises(UserError, match=r"tracing is impossible here: (root|raw-tracepoints)"):
            cap.choose_backend("auto", broken)
        with pytest.raises(UserError, match="tracepoint backend cannot run here"):
            cap.choose_backend("tracepoint", broken)


def test_without_bcc_detection_reports_instead_of_raising(
    monkeypatch: pytest.MonkeyPatch, probed: Probed
) -> None:
    monkeypatch.setitem(sys.modules, "bcc", None)  # makes `import bcc` fail
    cap.detect.cache_clear()
    try:
        caps = cap.detect()
    finally:
        cap.detect.cache_clear()
    assert caps.bcc_version is None and caps.compile_ms is None
    assert not caps.ok("bcc") and "python3-bpfcc" in caps.check("bcc").fix
    assert not caps.ok("raw-tracepoints") and not caps.ok("sched:sched_switch")
    assert caps.ok("kallsyms") and caps.ok("shmem-minor")  # the rest is still probed
    assert not cap.tracing_possible(caps)
    with pytest.raises(UserError, match="tracing is impossible here: bcc missing"):
        cap.choose_backend("auto", caps)


def test_attempt_captures_c_level_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    def noisy_failure() -> None:
        os.write(2, b"libbpf: something failed\n")
        raise Exception("load refused")

    assert checks.attempt(noisy_failure) == (None, "load refused [libbpf: something failed]")
    assert checks.attempt(lambda: 42) == (42, "")
    assert capfd.readouterr().err == ""


def test_btf_reading_agrees_with_bpftool():
    """The BTF walk that start-up uses against bpftool's own reading of the running kernel:
    the struct offsets BPF reads at, and the functions' arities fentry needs."""
    from uffdtrace.probes import kernel
    from uffdtrace.probes.tracepoint import KERNEL_OFFSETS

    dump = subprocess.run(["bpftool", "btf", "dump", "file", str(kernel.VMLINUX_BTF), "format", "raw"],
                          capture_output=True, text=True, check=True).stdout
    for struct_name, member in KERNEL_OFFSETS.values():
        header = dump.index(f"] STRUCT '{struct_name}' size=")
        body = dump[header:].split("\n[", 1)[0]
        bits = body.split(f"\n\t'{member}' type_id=", 1)[1].split("bits_offset=", 1)[1].split()[0]
        assert kernel.struct_member_offsets(struct_name, (member,)) == {member: int(bits) // 8}
    arity = kernel.Btf(kernel.VMLINUX_BTF.read_bytes()).function_arity()
    for name in ("handle_userfault", "userfaultfd_ioctl", "hugetlb_mfill_atomic_pte"):
        proto = dump.split(f"] FUNC '{name}' type_id=", 1)[1].split()[0]
        vlen = dump.split(f"\n[{proto}] FUNC_PROTO ", 1)[1].split("vlen=", 1)[1].split()[0]
        assert arity[name] == int(vlen)
