"""Facts about the running kernel that BPF programs are compiled against.

The kernel headers on these machines belong to another kernel (docs/design.md, 'Kernel-header
fallback'), so struct layouts come from the running kernel's BTF and function addresses from
/proc/kallsyms (docs/design.md, 'What comes from the running kernel').
"""

from __future__ import annotations

import bisect
import functools
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from uffdtrace.errors import UserError

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
HIDE_SYMBOLS_ENV = "UFFDTRACE_HIDE_SYMBOLS"


def hidden_symbols() -> frozenset[str]:
    """Kernel functions to treat as absent, from $UFFDTRACE_HIDE_SYMBOLS (comma-separated):
    exercises the fallbacks of the kprobe backend on a kernel that has them all."""
    return frozenset(filter(None, os.environ.get(HIDE_SYMBOLS_ENV, "").split(",")))


@dataclass(frozen=True)
class KernelSymbols:
    """Text symbols of /proc/kallsyms, sorted by address."""

    addrs: list[int]
    names: list[str]

    def range_of(self, name: str) -> tuple[int, int] | None:
        """[start, end) of a function: from its address to the next symbol's."""
        try:
            i = self.names.index(name)
        except ValueError:
            return None
        end = next((a for a in self.addrs[i + 1 :] if a > self.addrs[i]), self.addrs[i] + 1)
        return self.addrs[i], end

    @functools.cached_property
    def present(self) -> frozenset[str]:
        return frozenset(self.names)

    def name_at(self, addr: int) -> str | None:
        i = bisect.bisect_right(self.addrs, addr) - 1
        return self.names[i] if i >= 0 else None


@functools.cache
def kallsyms() -> KernelSymbols:
    entries = []
    hidden = hidden_symbols()
    with open("/proc/kallsyms") as f:
        for line in f:
            addr, kind, name = line.split()[:3]
            if kind in "tT" and name not in hidden:
                entries.append((int(addr, 16), name))
    entries.sort()
    if not entries or entries[0][0] == 0:
        raise UserError("/proc/kallsyms shows no addresses: run as root (kptr_restrict)")
    return KernelSymbols([a for a, _ in entries], [n for _, n in entries])


@functools.cache
def _btf_dump() -> str:
    """The running kernel's BTF as text (bpftool's raw format)."""
    if not VMLINUX_BTF.exists():
        raise UserError(f"{VMLINUX_BTF} is missing: the kernel was built without BTF")
    try:
        # in its own session: a Ctrl-C meant for uffdtrace (which stops cleanly) is not its
        return subprocess.run(
            ["bpftool", "btf", "dump", "file", str(VMLINUX_BTF), "format", "raw"],
            capture_output=True, text=True, check=True, start_new_session=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise UserError(f"cannot read kernel BTF with bpftool ({e}): apt-get install bpftool") from e


@functools.cache
def btf_function_arity() -> dict[str, int]:
    """Functions the kernel's BTF describes (those fentry/fexit can attach to) -> their number
    of arguments (trampolines have a limit: 6 on x86-64 before Linux 6.6)."""
    dump = _btf_dump()
    arity = {m[1]: int(m[2]) for m in re.finditer(
        r"^\[(\d+)\] FUNC_PROTO '\(anon\)' ret_type_id=\d+ vlen=(\d+)$", dump, re.M)}
    hidden = hidden_symbols()
    return {m[1]: arity[m[2]] for m in re.finditer(r"^\[\d+\] FUNC '(\w+)' type_id=(\d+)", dump, re.M)
            if m[2] in arity and m[1] not in hidden}


@functools.cache
def struct_member_offsets(struct: str, members: tuple[str, ...]) -> dict[str, int]:
    """Byte offsets of `members` in `struct`, from the running kernel's BTF (via bpftool)."""
    dump = _btf_dump()
    start = re.search(rf"^\[\d+\] STRUCT '{re.escape(struct)}' size=\d+ vlen=\d+$", dump, re.M)
    if not start:
        raise UserError(f"struct {struct} not found in kernel BTF")
    offsets: dict[str, int] = {}
    for line in dump[start.end() + 1 :].splitlines():
        m = re.match(r"\s+'([\w()]+)' type_id=\d+ bits_offset=(\d+)", line)  # '(anon)' too
        if not m:
            break
        if m[1] in members:
            offsets[m[1]] = int(m[2]) // 8
    missing = set(members) - offsets.keys()
    if missing:
        raise UserError(f"struct {struct} has no member(s) {', '.join(sorted(missing))} in BTF")
    return offsets
