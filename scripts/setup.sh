#!/usr/bin/env bash
# Idempotent set-up from nothing on a Debian 12 machine, as root:
#   Debian packages (+ qemu and Debian's kernel for the VM tests) -> tracefs -> kernel-header
#   fallback -> venv (+ Debian's bcc) -> project + cffi build (+ test tools, virtme-ng) ->
#   the kernel's userfaultfd selftest, built from Debian's linux-source-6.1 (tests/test_foreign.py).
# Every step checks first and says what it did. Hugepages are reserved per run by the tools
# and the test suite themselves (and restored afterwards), not here.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*"; }

[[ $(id -u) -eq 0 ]] || { echo "setup: must run as root (BPF, userfaultfd, hugepages)" >&2; exit 1; }

APT_PACKAGES=(python3-bpfcc bpftrace bpftool linux-headers-amd64 python3-venv python3-dev
              gcc make libffi-dev tmux)
# `make vmtest` boots Debian's own kernel (linux-image-amd64: kprobes, which this kernel lacks)
# under qemu TCG with virtme-ng; busybox builds its initramfs. Checked one by one like the rest:
# the kernel's initramfs trigger alone takes about a minute, so nothing is reinstalled.
VM_PACKAGES=(qemu-system-x86 busybox-static linux-image-amd64)
apt_updated=
apt_install_missing() {  # LABEL PACKAGE...
    local label=$1 missing=() p
    shift
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        say "installing $label: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        [[ -n $apt_updated ]] || { apt-get update -qq; apt_updated=yes; }
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        say "$label present"
    fi
}
apt_install_missing "Debian packages" "${APT_PACKAGES[@]}"
apt_install_missing "VM-test packages (qemu, busybox, Debian's kernel)" "${VM_PACKAGES[@]}"

# Prometheus, for the exporter's tests: each test starts its own /usr/bin/prometheus on a free
# port (tests/prometheus.py). Debian's package also sets up a service on :9090, which its
# postinst starts (systemd; or its init.d script, unless a policy-rc.d forbids it, as Docker's
# does). That service is stopped and disabled, every run, so no daemon of the package stays up.
apt_install_missing "Prometheus (exporter tests)" prometheus
if [[ -d /run/systemd/system ]]; then
    if systemctl --quiet is-enabled prometheus 2>/dev/null || systemctl --quiet is-active prometheus; then
        systemctl disable --now --quiet prometheus
        say "stopped and disabled Debian's prometheus service (the tests start their own)"
    fi
else
    # No systemd: the init.d script's own pidfile tells whether its daemon runs (other
    # prometheus processes, such as the tests', are left alone).
    if start-stop-daemon --status --pidfile /run/prometheus/prometheus.pid --exec /usr/bin/prometheus; then
        /etc/init.d/prometheus stop >/dev/null
        say "stopped Debian's prometheus daemon (the tests start their own)"
    fi
    if compgen -G '/etc/rc[2345].d/S*prometheus' >/dev/null; then
        update-rc.d prometheus disable >/dev/null 2>&1
        say "disabled Debian's prometheus init script at boot"
    fi
fi

# BCC and bpftrace look for tracepoint formats in tracefs.
if [[ ! -e /sys/kernel/tracing/events ]]; then
    mount -t tracefs nodev /sys/kernel/tracing && say "mounted tracefs on /sys/kernel/tracing"
fi
if [[ ! -e /sys/kernel/debug/tracing ]]; then
    mount -t debugfs nodev /sys/kernel/debug 2>/dev/null && say "mounted debugfs on /sys/kernel/debug" || true
fi

# BCC compiles against /lib/modules/$(uname -r)/build. With no headers for the running kernel,
# point it at Debian's newest installed ones (docs/design.md, 'Kernel-header fallback'): the
# BPF programs take only struct pt_regs and BCC's helpers from them (struct offsets come from
# the running kernel's BTF), so a version mismatch is harmless.
kdir="/lib/modules/$(uname -r)"
if [[ ! -e "$kdir/build/include/linux/kconfig.h" && ! -e "$kdir/source/include/linux/kconfig.h" ]]; then
    arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)
    [[ -n "$arch_dir" ]] || { echo "setup: no /usr/src/linux-headers-*-amd64 after installing linux-headers-amd64" >&2; exit 1; }
    common_dir="${arch_dir%-amd64}-common"
    mkdir -p "$kdir"
    ln -sfn "$arch_dir" "$kdir/build"
    ln -sfn "$common_dir" "$kdir/source"
    say "no headers for kernel $(uname -r): linked $kdir/build -> $arch_dir and $kdir/source -> $common_dir"
else
    say "kernel headers usable at $kdir"
fi

# A venv on Debian's interpreter that also sees Debian's dist-packages (for `bcc`).
VENV=.venv
if ! "$VENV/bin/python" -c 'import bcc' 2>/dev/null; then
    rm -rf "$VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    say "created $VENV on /usr/bin/python3 with system site-packages (Debian's bcc)"
fi
# PyPI's `bcc` is an unrelated package that would shadow Debian's module.
if "$VENV/bin/python" -m pip show -q bcc 2>/dev/null | grep -q .; then
    "$VENV/bin/python" -m pip uninstall -y -q bcc && say "removed PyPI's unrelated 'bcc' package from $VENV"
fi

stamp="$VENV/.uffdtrace-installed"
NATIVE=(uffdtrace.exerciser._exerciser uffdtrace.migration._migration)
import_native() { "$VENV/bin/python" -c "import bcc; $(printf 'import %s; ' "${NATIVE[@]}")"; }
# Reinstall when packaging or any cffi source changed since the last install, or vng is missing.
changed=yes
if [[ -e "$stamp" ]]; then
    changed=$(find pyproject.toml setup.py uffdtrace/*.h uffdtrace/*/build.py uffdtrace/*/*.[ch] -newer "$stamp")
fi
if [[ -n "$changed" ]] || ! import_native 2>/dev/null || [[ ! -x "$VENV/bin/vng" ]]; then
    say "installing uffdtrace (editable, with the test tools and virtme-ng) and building its cffi modules"
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    touch "$stamp"
else
    say "uffdtrace installed in $VENV"
fi
import_native || { echo "setup: venv cannot import bcc and the cffi modules" >&2; exit 1; }

# The kernel's own userfaultfd selftest (Linux 6.1), a foreign workload for tests/test_foreign.py.
# Only its folder and kselftest* are taken out of Debian's source tarball (about 8 s: the whole
# .xz is decompressed), into a cache outside the repository; the build takes about 1 s.
apt_install_missing "userfaultfd selftest source (Linux 6.1)" linux-source-6.1 libc6-dev
SELFTEST_CACHE=/var/cache/uffdtrace/selftests
SELFTEST_SRC="$SELFTEST_CACHE/src/tools/testing/selftests"
if [[ -x "$SELFTEST_CACHE/userfaultfd" ]]; then
    say "userfaultfd selftest built at $SELFTEST_CACHE/userfaultfd"
else
    if [[ ! -e "$SELFTEST_SRC/vm/userfaultfd.c" || ! -e "$SELFTEST_SRC/kselftest.h" ]]; then
        rm -rf "$SELFTEST_CACHE/src"
        mkdir -p "$SELFTEST_CACHE/src"
        tar -xJf /usr/src/linux-source-6.1.tar.xz -C "$SELFTEST_CACHE/src" --strip-components=1 \
            --wildcards '*/tools/testing/selftests/vm/*' '*/tools/testing/selftests/kselftest*'
        say "extracted tools/testing/selftests/{vm/,kselftest*} of linux-source-6.1 into $SELFTEST_CACHE/src"
    fi
    (cd "$SELFTEST_SRC/vm" && gcc -O2 -pthread -I.. userfaultfd.c vm_util.c -lrt \
        -o "$SELFTEST_CACHE/userfaultfd.tmp")
    mv "$SELFTEST_CACHE/userfaultfd.tmp" "$SELFTEST_CACHE/userfaultfd"
    say "built the userfaultfd selftest: $SELFTEST_CACHE/userfaultfd"
fi
say "ready: $VENV/bin/uffdtrace"
