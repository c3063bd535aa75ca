"""The kernel-function hooks of the kprobe and fentry backends (uffdtrace/probes/hooks.py,
uffdtrace/probes/kprobe.py) on synthetic kernels: which symbol each hook takes, the C entry
points generated for it, and how the backends attach them. Nothing is loaded into a kernel:
the generated C is compiled with the system's C compiler against bpf/kprobe.c's actions and
stand-ins for BCC's macros, and attaching goes to a fake BPF object.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from pathlib import Path

import pytest

from tests.unit.btf_blob import FUNC, FUNC_PROTO, INT, Blob
from tests.unit.test_records import TYPEDEFS
from uffdtrace.errors import UserError
from uffdtrace.probes import hooks, kernel, kprobe
from uffdtrace.probes.kernel import KernelSymbols
from uffdtrace.probes.kprobe import KRETPROBE_MAXACTIVE, FentryBackend, KprobeBackend
from uffdtrace.probes.records import HEADER
from uffdtrace.probes.tracepoint import BPF_DIR, TracepointBackend, TraceScope

# The hook symbols of two kernels (docs/design.md, "Renamed userfaultfd internals"), among
# others of no interest. Like Debian's 6.1: the mcopy_* family.
LINUX_6_1 = {"handle_userfault", "hugetlb_fault", "shmem_fault", "shmem_get_folio_gfp",
             "userfaultfd_ioctl", "mcopy_continue", "mcopy_atomic", "mfill_zeropage",
             "hugetlb_mcopy_atomic_pte", "shmem_mfill_atomic_pte", "mcontinue_atomic_pte",
             "mfill_atomic_install_pte", "schedule", "do_user_addr_fault"}
# Like the 6.18 development kernel: mfill_atomic_*, and no mfill_atomic_pte_continue.
LINUX_6_18 = {"handle_userfault", "hugetlb_fault", "shmem_fault", "shmem_get_folio_gfp",
              "userfaultfd_ioctl", "mfill_atomic_continue", "mfill_atomic_copy",
              "mfill_atomic_zeropage", "hugetlb_mfill_atomic_pte", "shmem_mfill_atomic_pte",
              "mfill_atomic_install_pte", "schedule"}
RESOLVED_6_1 = {"fault": "handle_userfault", "hugetlb-fault": "hugetlb_fault",
                "shmem-fault": "shmem_fault", "ioctl": "userfaultfd_ioctl",
                "continue": "mcopy_continue", "copy": "mcopy_atomic", "zeropage": "mfill_zeropage",
                "hugetlb-install": "hugetlb_mcopy_atomic_pte",
                "shmem-install": "shmem_mfill_atomic_pte", "pte-install": "mcontinue_atomic_pte"}
RESOLVED_6_18 = {"fault": "handle_userfault", "hugetlb-fault": "hugetlb_fault",
                 "shmem-fault": "shmem_fault", "ioctl": "userfaultfd_ioctl",
                 "continue": "mfill_atomic_continue", "copy": "mfill_atomic_copy",
                 "zeropage": "mfill_atomic_zeropage", "hugetlb-install": "hugetlb_mfill_atomic_pte",
                 "shmem-install": "shmem_mfill_atomic_pte", "pte-install": "mfill_atomic_install_pte"}
BY_NAME = {h.name: h for h in hooks.HOOKS}


def symbols(names: set[str]) -> KernelSymbols:
    ordered = sorted(names)
    return KernelSymbols([0xFFFFFFFF81000000 + 0x100 * i for i in range(len(ordered))], ordered)


# --- which symbol each hook takes ---------------------------------------------------------


def test_the_hook_table():
    assert len({h.name for h in hooks.HOOKS}) == len(hooks.HOOKS)
    assert [h.name for h in hooks.HOOKS if h.required] == ["fault"]
    assert all(h.symbols and h.gives for h in hooks.HOOKS)
    assert sorted(hooks.SYMBOLS) == sorted({s for h in hooks.HOOKS for s in h.symbols})
    # fexit gets the return value after every argument, so a return action that reads `ret`
    # needs all of them: userfaultfd_ioctl(file, cmd, arg)
    assert [h.name for h in hooks.HOOKS if h.ret and re.search(r"\bret\b", h.ret)] == ["ioctl"]
    assert len(BY_NAME["ioctl"].params) == 3


@pytest.mark.parametrize(("present", "resolved"), [
    (LINUX_6_1, RESOLVED_6_1),
    (LINUX_6_18, RESOLVED_6_18),
    (set(), dict.fromkeys(RESOLVED_6_1)),
    # both families at once: the newer names are preferred
    (LINUX_6_1 | LINUX_6_18 | {"mfill_atomic_pte_continue"},
     {**RESOLVED_6_18, "pte-install": "mfill_atomic_pte_continue"}),
    # an inlined shmem_fault, no hugetlb: the second candidate, and nothing
    (LINUX_6_18 - {"shmem_fault", "hugetlb_fault", "hugetlb_mfill_atomic_pte"},
     {**RESOLVED_6_18, "shmem-fault": "shmem_get_folio_gfp", "hugetlb-fault": None,
      "hugetlb-install": None}),
], ids=["6.1", "6.18", "none", "both-families", "fallbacks"])
def test_each_hook_takes_its_first_candidate_present(present, resolved):
    assert hooks.resolve(present) == resolved
    assert hooks.resolve(iter(sorted(present))) == resolved  # any iterable, once


# --- the generated C ----------------------------------------------------------------------


def test_kprobe_functions_read_the_registers_of_the_arguments():
    assert hooks.kprobe_functions(BY_NAME["fault"]) == ("hook_fault", None, (
        "int hook_fault(struct pt_regs *ctx) {\n"
        "    void *vmf = (void *)PT_REGS_PARM1(ctx);\n"
        "    u64 reason = (u64)PT_REGS_PARM2(ctx);\n"
        "    return uffd_fault(reason);\n"
        "}\n"))
    assert hooks.kprobe_functions(BY_NAME["ioctl"]) == ("hook_ioctl", "hook_ioctl_return", (
        "int hook_ioctl(struct pt_regs *ctx) {\n"
        "    void *file = (void *)PT_REGS_PARM1(ctx);\n"
        "    u32 cmd = (u32)PT_REGS_PARM2(ctx);\n"
        "    u64 arg = (u64)PT_REGS_PARM3(ctx);\n"
        "    return ioctl_enter(file, cmd, arg);\n"
        "}\n"
        "int hook_ioctl_return(struct pt_regs *ctx) {\n"
        "    long ret = PT_REGS_RC(ctx);\n"
        "    return ioctl_return(ret);\n"
        "}\n"))
    assert hooks.kprobe_functions(BY_NAME["hugetlb-install"]) == (
        "hook_hugetlb_install", "hook_hugetlb_install_return",
        "int hook_hugetlb_install(struct pt_regs *ctx) {\n"
        "    return install_enter(IO_HUGETLB);\n"
        "}\n"
        "int hook_hugetlb_install_return(struct pt_regs *ctx) {\n"
        "    long ret = PT_REGS_RC(ctx);\n"
        "    return install_return();\n"
        "}\n")


@pytest.mark.parametrize("hook", hooks.HOOKS, ids=lambda h: h.name)
def test_kprobe_function_names_are_the_ones_defined(hook):
    entry, ret, src = hooks.kprobe_functions(hook)
    defined = re.findall(r"^int (\w+)\(struct pt_regs \*ctx\) \{$", src, re.M)
    assert defined == [entry] + ([ret] if ret else [])
    assert entry == "hook_" + hook.name.replace("-", "_")
    assert (ret is None) == (hook.ret is None)


@pytest.mark.parametrize(("hook", "symbol", "expected"), [
    ("fault", "handle_userfault",
     "KFUNC_PROBE(handle_userfault, void *vmf, u64 reason) { return uffd_fault(reason); }\n"),
    ("ioctl", "userfaultfd_ioctl",
     "KFUNC_PROBE(userfaultfd_ioctl, void *file, u32 cmd, u64 arg) { return ioctl_enter(file, cmd, arg); }\n"
     "KRETFUNC_PROBE(userfaultfd_ioctl, void *file, u32 cmd, u64 arg, long ret) "
     "{ return ioctl_return(ret); }\n"),
    # a return action without `ret` needs no arguments (mfill_return is not `ret`)
    ("continue", "mcopy_continue",
     "KFUNC_PROBE(mcopy_continue) { return mfill_enter(); }\n"
     "KRETFUNC_PROBE(mcopy_continue) { return mfill_return(); }\n"),
    ("continue", "mfill_atomic_continue",
     "KFUNC_PROBE(mfill_atomic_continue) { return mfill_enter(); }\n"
     "KRETFUNC_PROBE(mfill_atomic_continue) { return mfill_return(); }\n"),
    ("shmem-fault", "shmem_get_folio_gfp",
     "KFUNC_PROBE(shmem_get_folio_gfp) { return fault_path(F_SHMEM); }\n"),
])
def test_fentry_programs_name_the_symbol(hook, symbol, expected):
    assert hooks.fentry_programs(BY_NAME[hook], symbol) == expected


# Stand-ins for what BCC provides (x86-64 registers, its KFUNC_PROBE macros), then
# bpf/kprobe.c's actions as prototypes: the generated code must call them as they are declared.
BCC_STANDINS = """
struct pt_regs { unsigned long di, si, dx, cx, r8, r9, ax; };
#define PT_REGS_PARM1(x) ((x)->di)
#define PT_REGS_PARM2(x) ((x)->si)
#define PT_REGS_PARM3(x) ((x)->dx)
#define PT_REGS_PARM4(x) ((x)->cx)
#define PT_REGS_PARM5(x) ((x)->r8)
#define PT_REGS_PARM6(x) ((x)->r9)
#define PT_REGS_RC(x) ((x)->ax)
#define KFUNC_PROBE(event, ...) int kfunc__##event(__VA_ARGS__)
#define KRETFUNC_PROBE(event, ...) int kretfunc__##event(__VA_ARGS__)
"""
ACTION = re.compile(r"^static __always_inline int (\w+)\(([^)]*)\) \{$", re.M)


def kprobe_c_actions() -> dict[str, str]:
    """bpf/kprobe.c's actions: name -> parameter list."""
    return dict(ACTION.findall(BPF_DIR.joinpath("kprobe.c").read_text()))


def syntax_check(tmp_path: Path, generated: str) -> None:
    prototypes = "".join(f"int {name}({params});\n" for name, params in kprobe_c_actions().items())
    src = tmp_path / "entry_points.c"
    src.write_text(f"#include <stdint.h>\n{TYPEDEFS}\n{HEADER}\n{BCC_STANDINS}\n{prototypes}\n{generated}")
    out = subprocess.run(["cc", "-fsyntax-only", "-std=gnu11", "-Wall", "-Werror",
                          "-Wno-unused-variable", str(src)], capture_output=True, text=True,
                         env={**os.environ, "LC_ALL": "C"})  # the compiler's messages in English
    assert out.returncode == 0, out.stderr


def test_every_action_a_hook_calls_is_in_kprobe_c():
    actions = kprobe_c_actions()
    called = {re.match(r"\w+", call)[0] for h in hooks.HOOKS for call in (h.entry, h.ret) if call}
    assert called <= actions.keys(), called - actions.keys()
    assert actions["uffd_fault"] == "u64 reason" and actions["ioctl_return"] == "long ret"


def test_the_generated_entry_points_compile(tmp_path):
    """Every kprobe function, and the fentry programs of every hook on each of its symbols,
    in one translation unit: no name defined twice, every call as kprobe.c declares it."""
    generated = "".join(hooks.kprobe_functions(h)[2] for h in hooks.HOOKS) + "".join(
        hooks.fentry_programs(h, s) for h in hooks.HOOKS for s in h.symbols)
    syntax_check(tmp_path, generated)


def test_a_wrong_call_does_not_compile(tmp_path):
    """The check above can fail: an action called with an argument it does not take."""
    wrong = hooks.Hook("x", ("x",), (("u64", "a"),), "mfill_enter(a)", None, "nothing")
    with pytest.raises(AssertionError, match=r"too many arguments to function .mfill_enter"):
        syntax_check(tmp_path, hooks.kprobe_functions(wrong)[2])


# --- the backends, without BPF ------------------------------------------------------------

# What the BTF of a 6.1 build may say: function -> number of arguments. mcontinue_atomic_pte
# is static and inlined (not in BTF); hugetlb_mcopy_atomic_pte and shmem_mfill_atomic_pte take
# more than a trampoline can (6 on x86-64 before 6.6).
ARITY_6_1 = {"handle_userfault": 2, "hugetlb_fault": 4, "shmem_fault": 1, "shmem_get_folio_gfp": 5,
             "userfaultfd_ioctl": 3, "mcopy_continue": 4, "mcopy_atomic": 6, "mfill_zeropage": 4,
             "hugetlb_mcopy_atomic_pte": 8, "shmem_mfill_atomic_pte": 7,
             "mfill_atomic_install_pte": 6}
TRAMPOLINED_6_1 = {"fault": "handle_userfault", "hugetlb-fault": "hugetlb_fault",
                   "shmem-fault": "shmem_fault", "ioctl": "userfaultfd_ioctl",
                   "continue": "mcopy_continue", "copy": "mcopy_atomic", "zeropage": "mfill_zeropage"}


@pytest.fixture
def kernel_6_1(monkeypatch):
    monkeypatch.setattr(kprobe, "kallsyms", lambda: symbols(LINUX_6_1))
    monkeypatch.setattr(kprobe, "btf_function_arity", lambda: ARITY_6_1)


class FakeBPF:
    """BCC's attach/detach calls, recorded; `refuse` names symbols that take no kprobe, and
    ("return", symbol) those that take no kretprobe (notrace, or inlined)."""

    def __init__(self, *refuse) -> None:
        self.refuse = set(refuse)
        self.kprobes: dict[str, str] = {}
        self.kretprobes: dict[str, tuple[str, int]] = {}
        self.detached: list[str] = []

    def attach_kprobe(self, event: str, fn_name: str) -> None:
        if event in self.refuse:
            raise Exception(f"cannot attach kprobe, probe entry may not exist: {event}")
        self.kprobes[event] = fn_name

    def attach_kretprobe(self, event: str, fn_name: str, maxactive: int = 0) -> None:
        if ("return", event) in self.refuse:
            raise Exception(f"cannot attach kprobe, probe entry may not exist: {event}")
        self.kretprobes[event] = (fn_name, maxactive)

    def detach_kprobe(self, event: str, fn_name: str) -> None:
        assert self.kprobes.pop(event) == fn_name
        self.detached.append(event)


def backend(cls=KprobeBackend, mode: str = "full", bpf: FakeBPF | None = None):
    return cls(mode=mode, scope=TraceScope(), _bpf=bpf)


def test_kprobe_backend_compiles_every_entry_point_and_attaches_what_the_kernel_has(kernel_6_1):
    be = backend()
    assert be.entry_points() == "".join(hooks.kprobe_functions(h)[2] for h in hooks.HOOKS)
    assert be.resolved() == RESOLVED_6_1
    be._bpf = FakeBPF()
    be.attach()
    assert be.attached == {name: f"kprobe:{s}" for name, s in RESOLVED_6_1.items()}
    assert be._bpf.kprobes["mcopy_continue"] == "hook_continue"
    assert be._bpf.kretprobes["userfaultfd_ioctl"] == ("hook_ioctl_return", KRETPROBE_MAXACTIVE)
    assert "handle_userfault" not in be._bpf.kretprobes  # the fault hook has no return action


def test_a_symbol_that_takes_no_probe_falls_back_to_the_next(kernel_6_1):
    """shmem_fault refuses a kprobe: shmem_get_folio_gfp. mcontinue_atomic_pte takes the entry
    probe but not the return probe: the entry is detached again, mfill_atomic_install_pte
    gets both. hugetlb_fault has no other candidate: that hook stays unattached."""
    be = backend(bpf=FakeBPF("shmem_fault", ("return", "mcontinue_atomic_pte"), "hugetlb_fault"))
    be.attach()
    assert be.attached["shmem-fault"] == "kprobe:shmem_get_folio_gfp"
    assert be.attached["pte-install"] == "kprobe:mfill_atomic_install_pte"
    assert be.attached["hugetlb-fault"] is None
    assert be._bpf.detached == ["mcontinue_atomic_pte"]
    assert "mcontinue_atomic_pte" not in be._bpf.kprobes


def test_without_the_fault_hook_the_backend_refuses(kernel_6_1):
    be = backend(bpf=FakeBPF("handle_userfault"))
    with pytest.raises(UserError) as e:
        be.attach()
    assert str(e.value) == ("the kprobe backend needs handle_userfault, which this kernel does not "
                            "let it hook: use --backend tracepoint")


@pytest.mark.parametrize(("present", "mode", "flag", "sees"), [
    (LINUX_6_1, "light", True, True),
    (LINUX_6_1, "full", True, True),
    (LINUX_6_1 - {"userfaultfd_ioctl"}, "full", False, True),  # the syscall tracepoints' view
    (LINUX_6_1 - {"userfaultfd_ioctl"}, "light", False, False),
], ids=["hooked-light", "hooked-full", "no-hook-full", "no-hook-light"])
def test_ioctls_from_the_hook_or_the_syscall_tracepoints(monkeypatch, present, mode, flag, sees):
    monkeypatch.setattr(kprobe, "kallsyms", lambda: symbols(present))
    monkeypatch.setattr(TracepointBackend, "cflags", lambda self: ["-DFROM_TRACEPOINT"])
    be = backend(mode=mode, bpf=FakeBPF())
    assert be.cflags() == ["-DFROM_TRACEPOINT", "-DKPROBE_BACKEND", *(["-DIOCTL_KPROBE"] if flag else [])]
    be.attach()
    assert be.sees_ioctls() == sees


def test_a_hooked_ioctl_that_would_not_attach_sees_no_ioctls(kernel_6_1):
    be = backend(bpf=FakeBPF(("return", "userfaultfd_ioctl")))
    be.attach()
    assert be.attached["ioctl"] is None and not be.sees_ioctls()


def test_fentry_backend_trampolines_what_btf_allows(kernel_6_1):
    """Trampolines for the symbols BTF describes with at most 6 arguments, kprobes for the
    rest; the fentry programs are compiled for the symbols resolved on this kernel."""
    be = backend(FentryBackend)
    assert be.trampolined() == TRAMPOLINED_6_1
    src = be.entry_points()
    assert src.startswith(KprobeBackend.entry_points(be))
    assert re.findall(r"^KFUNC_PROBE\((\w+)", src, re.M) == list(TRAMPOLINED_6_1.values())
    assert re.findall(r"^KRETFUNC_PROBE\((\w+)", src, re.M) == [
        "userfaultfd_ioctl", "mcopy_continue", "mcopy_atomic", "mfill_zeropage"]
    be._bpf = FakeBPF()
    be.attach()
    assert be.attached == {**{n: f"fentry:{s}" for n, s in TRAMPOLINED_6_1.items()},
                           "hugetlb-install": "kprobe:hugetlb_mcopy_atomic_pte",
                           "shmem-install": "kprobe:shmem_mfill_atomic_pte",
                           "pte-install": "kprobe:mcontinue_atomic_pte"}
    assert set(be._bpf.kprobes) == {"hugetlb_mcopy_atomic_pte", "shmem_mfill_atomic_pte",
                                    "mcontinue_atomic_pte"}


def test_fentry_backend_without_the_fault_hook_refuses(monkeypatch):
    monkeypatch.setattr(kprobe, "kallsyms", lambda: symbols(LINUX_6_1 - {"handle_userfault"}))
    monkeypatch.setattr(kprobe, "btf_function_arity", lambda: ARITY_6_1)
    with pytest.raises(UserError, match=r"^the fentry backend needs handle_userfault"):
        backend(FentryBackend, bpf=FakeBPF()).attach()


def functions_blob() -> kernel.Btf:
    """Prototypes with 2, 8 and 1 arguments, and a FUNC whose prototype is not there."""
    b = Blob()
    b.add(INT, "int", extra=struct.pack("<I", 32))
    two = b.add(FUNC_PROTO, "", [struct.pack("<II", b.name(a), 1) for a in ("vmf", "reason")])
    b.add(FUNC, "handle_userfault", size_or_type=two)
    eight = b.add(FUNC_PROTO, "", [struct.pack("<II", 0, 1)] * 8)
    b.add(FUNC, "hugetlb_mcopy_atomic_pte", size_or_type=eight)
    b.add(FUNC, "shmem_fault", size_or_type=b.count + 2)  # its prototype comes after it
    one = b.add(FUNC_PROTO, "", [struct.pack("<II", b.name("vmf"), 1)])
    b.add(FUNC, "hidden_function", size_or_type=one)
    b.add(FUNC, "no_proto", size_or_type=99)
    return kernel.Btf(b.bytes())


def test_btf_function_arity(monkeypatch):
    monkeypatch.setattr(kernel, "vmlinux_btf", functions_blob)
    monkeypatch.setenv(kernel.HIDE_SYMBOLS_ENV, "hidden_function")
    assert kernel.btf_function_arity.__wrapped__() == {
        "handle_userfault": 2, "hugetlb_mcopy_atomic_pte": 8, "shmem_fault": 1}
