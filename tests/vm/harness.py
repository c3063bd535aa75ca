"""Host side of the VM harness: boot Debian's distro kernel under qemu TCG and trace in it.

The host kernel has no kprobes; Debian's own kernel (linux-image-amd64, 6.1) has them. virtme-ng
(`vng`) boots it on a read-only 9p snapshot of this very root filesystem, so the guest runs
the same venv, BCC and kernel headers (/lib/modules/<ver>/build from linux-headers-amd64).
Only OUTDIR is writable back to the host (the guest's other writes go to overlays in its RAM).
/dev/kvm must never be used here (this machine is itself a paravirtualized guest): always
--disable-kvm, i.e. TCG.

    python -m tests.vm.harness --out DIR [--only NAME ...] [--timeout S]

runs the sessions of tests/vm/scenarios.py by hand; `make vmtest` runs the tests on it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from tests.vm.scenarios import SESSIONS

PROJECT = Path(__file__).resolve().parents[2]
VENV_BIN = PROJECT / ".venv" / "bin"
GUEST = Path(__file__).with_name("guest.py")
# One vCPU: with two, the TCG guest hung in 2 of 4 full runs, both vCPUs spinning and nothing on
# the console, each time while a `record` was starting up (attaching and detaching kprobes and
# fentry programs, which patches kernel text across CPUs).
CPUS, MEMORY = 1, "2G"
SETUP_HINT = "run `make setup` (scripts/setup.sh installs the VM-test packages)"


class VMError(RuntimeError):
    """The VM could not be booted, or its run did not finish."""


def _version_key(version: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", version)]


def guest_kernel(boot: Path = Path("/boot"), modules: Path = Path("/lib/modules"),
                 running: str | None = None) -> tuple[str, Path]:
    """(version, image) of the newest /boot/vmlinuz-* that is not the running kernel and has
    /lib/modules/<version>/build: BCC compiles against those headers inside the guest."""
    running = running or os.uname().release
    found = {}
    for image in boot.glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        if version != running and (modules / version / "build").exists():
            found[version] = image
    if not found:
        raise VMError(f"no guest kernel: need a /boot/vmlinuz-<ver> other than the running {running} "
                      f"with /lib/modules/<ver>/build (linux-image-amd64 + linux-headers-amd64); "
                      f"{SETUP_HINT}")
    version = max(found, key=_version_key)
    return version, found[version]


def vng_command(image: Path, outdir: Path, timeout_s: int) -> list[str]:
    """vng booting `image` under TCG with OUTDIR shared read-write, running the guest runner
    (which stops by itself after `timeout_s`, so even a SIGKILLed harness leaves no VM for long)."""
    guest = shlex.join([str(VENV_BIN / "python"), str(GUEST), str(outdir), str(timeout_s)])
    # The project (with its venv) as an overlay: the guest then caches its lookups, which halves
    # every Python start-up (9p alone re-asks the host for each of its thousands of files).
    return [str(VENV_BIN / "vng"), "--run", str(image), "--disable-kvm", "--force-9p", "--verbose",
            "--cpus", str(CPUS), "--memory", MEMORY, "--overlay-rwdir", str(PROJECT),
            "--rwdir", str(outdir), "--exec", guest]


def _check_tools() -> None:
    """Missing tools are one clear error, not a traceback from deep inside vng."""
    needed = {"qemu-system-x86_64": shutil.which("qemu-system-x86_64"),
              "busybox": shutil.which("busybox"),
              str(VENV_BIN / "vng"): shutil.which(str(VENV_BIN / "vng"))}
    missing = [name for name, path in needed.items() if path is None]
    if missing:
        raise VMError(f"missing {', '.join(missing)}: {SETUP_HINT}")


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _copy_output(stream: IO[bytes], log: IO[bytes], echo: IO[str] | None) -> None:
    """Console lines into console.log as they come (and to `echo`: progress for a human)."""
    for line in stream:
        log.write(line)
        log.flush()
        if echo is not None:
            echo.write(line.decode(errors="replace"))
            echo.flush()


def _group_alive(pgid: int) -> bool:
    """Does a process (not a zombie) of this process group still exist?"""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _kill_group(pgid: int) -> None:
    """SIGKILL vng, virtme-run and qemu (they share the process group vng was started in) and
    wait until they are gone."""
    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (a CI timeout, `kill`) acts as Ctrl-C: the VM is killed on the way out, and pytest
    stops the session instead of booting the next VM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_in_vm(outdir: Path, scenarios: list[dict[str, Any]], timeout_s: int,
              echo: IO[str] | None = None) -> Path:
    """Boot the guest kernel, run tests/vm/guest.py on `scenarios` into `outdir` (which must be
    empty or absent) and return `outdir`. Raises VMError with the console's tail on any failure;
    after `timeout_s` the whole VM is killed. No qemu outlives this call."""
    outdir = outdir.resolve()
    if outdir.exists() and any(outdir.iterdir()):
        raise VMError(f"{outdir} is not empty: the VM run needs a fresh directory")
    if re.search(r"[,=\s]", str(outdir)):  # they would split vng's --rwdir or qemu's -fsdev
        raise VMError(f"{outdir}: no commas, '=' or spaces in the output directory, please")
    names = [s["name"] for s in scenarios]
    bad = [n for n in names if not re.fullmatch(r"[\w.-]+", n) or names.count(n) > 1]
    if bad:
        raise VMError(f"scenario names must be unique file names: {bad}")
    _check_tools()
    version, image = guest_kernel()

    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "scenarios.json").write_text(json.dumps(scenarios, indent=2))
    console = outdir / "console.log"
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if echo is not None:
        echo.write(f"vm: booting {image} under TCG ({CPUS} CPUs, {MEMORY}), "
                   f"{len(scenarios)} scenarios, console in {console}\n")
    with console.open("wb") as log, _sigterm_unwinds():
        proc = subprocess.Popen(vng_command(image, outdir, timeout_s), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=PROJECT,
                                start_new_session=True)
        assert proc.stdout is not None
        copier = threading.Thread(target=_copy_output, args=(proc.stdout, log, echo), daemon=True)
        copier.start()
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _kill_group(proc.pid)  # on timeout, on Ctrl-C, and in case anything lingers
            proc.wait()
            copier.join(10)

    if rc is None:
        raise VMError(f"VM run ({version}) timed out after {timeout_s} s and was killed; "
                      f"console tail ({console}):\n{_tail(console)}")
    if rc != 0 or not (outdir / "done").exists():
        raise VMError(f"VM run ({version}) failed: vng exit {rc}, "
                      f"{'done' if (outdir / 'done').exists() else 'no done marker'}; "
                      f"console tail ({console}):\n{_tail(console)}")
    return outdir


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.vm.harness`: the scenario table (or some rows) in one VM, by hand."""
    parser = argparse.ArgumentParser(prog="python -m tests.vm.harness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory (empty or absent)")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help=f"run only this session (repeatable): {', '.join(s.name for s in SESSIONS)}")
    parser.add_argument("--timeout", type=int, default=900, help="kill the VM after S seconds (900)")
    args = parser.parse_args(argv)
    unknown = set(args.only or ()) - {s.name for s in SESSIONS}
    if unknown:
        parser.error(f"unknown session: {', '.join(sorted(unknown))}")
    sessions = [s for s in SESSIONS if not args.only or s.name in args.only]
    try:
        outdir = run_in_vm(args.out, [s.scenario() for s in sessions], args.timeout, echo=sys.stderr)
    except VMError as e:
        print(f"vm: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vm: interrupted, VM killed", file=sys.stderr)
        return 130
    for r in json.loads((outdir / "results.json").read_text()):
        print(f"{r['name']:40} exit {r['returncode']!s:8} {r['wall_s']:7.1f} s")
    print(f"results in {outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
