"""One side of a migration, run as its own process inside its network namespace.

    python -m uffdtrace.migration.node source|target NETNS CONFIG_JSON

The source listens on SOURCE_ADDR:PORT and prints `{"listening": true}`; the target connects
twice (control, then demand). Each side runs its C half (GIL released), prints one JSON line
with its result (or `{"error": ...}`), then keeps its guest memfd open until stdin closes, so
the parent can compare the two memories byte for byte through /proc/PID/fd.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
from typing import Any

from pyroute2 import netns

from uffdtrace.migration._migration import ffi, lib
from uffdtrace.migration.link import SOURCE_ADDR

PORT = 7471
PR_SET_PDEATHSIG = 1
ROLE_CTL, ROLE_DEMAND = b"C", b"D"


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        sys.exit(1)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _nodelay(s: socket.socket) -> socket.socket:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _fields(res: Any, names: list[str]) -> dict[str, Any]:
    return {n: getattr(res, n) for n in names}


def _source(cfg: dict[str, Any]) -> dict[str, Any]:
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((SOURCE_ADDR, PORT))
        server.listen(2)
        _emit({"listening": True})
        conns = {}
        while len(conns) < 2:
            conn, _ = server.accept()
            conns[conn.recv(1)] = _nodelay(conn)
    c = ffi.new("struct mig_source_config *")
    for name in ("backing", "pattern", "vcpus", "pages", "page_size", "dirty_rate", "delay_ns",
                 "seed"):
        setattr(c, name, cfg[name])
    c.ctl_fd, c.demand_fd = conns[ROLE_CTL].fileno(), conns[ROLE_DEMAND].fileno()
    res = ffi.new("struct mig_source_result *")
    lib.mig_source_run(c, res)
    rounds = min(res.rounds, lib.MIG_MAX_ROUNDS)
    out = _fields(res, ["err", "memfd", "rounds", "dirtied", "pause_ns", "stale_pages",
                        "demand_requests", "pushed_pages", "push_skipped", "bytes_precopy",
                        "bytes_switch", "bytes_demand", "bytes_push"])
    out["round_pages"] = list(res.round_pages)[:rounds]
    out["round_dirty"] = list(res.round_dirty)[:rounds]
    out["step"] = ffi.string(res.step).decode()
    return out


def _target(cfg: dict[str, Any]) -> dict[str, Any]:
    conns = []
    for role in (ROLE_CTL, ROLE_DEMAND):
        s = _nodelay(socket.create_connection((SOURCE_ADDR, PORT), timeout=10))
        s.settimeout(None)
        s.sendall(role)
        conns.append(s)
    c = ffi.new("struct mig_target_config *")
    for name in ("backing", "pattern", "vcpus", "prefetch", "pages", "page_size", "max_rounds",
                 "converge_pages", "delay_ns", "seed", "stall_timeout_ns"):
        setattr(c, name, cfg[name])
    c.ctl_fd, c.demand_fd = conns[0].fileno(), conns[1].fileno()
    res = ffi.new("struct mig_target_result *")
    lib.mig_target_run(c, res)
    vcpus = cfg["vcpus"]
    out = _fields(res, [
        "err", "memfd", "rounds", "handler_tid", "prefetch_tid", "precopy_start_ns",
        "switch_ns", "pause_ns", "resume_ns", "end_ns", "stale_pages", "messages", "fresh",
        "demand_fetched", "prefetch_waits", "handler_continues", "eexist", "prefetched",
        "prefetch_discarded", "demand_fetch_total_ns", "demand_fetch_max_ns", "bytes_precopy",
        "bytes_switch", "bytes_demand", "bytes_push"])
    out["vcpu_tid"] = list(res.vcpu_tid)[:vcpus]
    out["vcpu_stall_ns"] = list(res.vcpu_stall_ns)[:vcpus]
    out["vcpu_max_stall_ns"] = list(res.vcpu_max_stall_ns)[:vcpus]
    out["step"] = ffi.string(res.step).decode()
    for s in conns:
        s.close()
    return out


def main(argv: list[str]) -> int:
    role, ns, cfg = argv[0], argv[1], json.loads(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent decides when we stop
    _die_with_parent()
    try:
        netns.setns(ns, flags=0)
        result = (_source if role == "source" else _target)(cfg)
    except OSError as e:
        _emit({"error": f"{role}: {e}"})
        return 1
    result["pid"] = os.getpid()
    _emit(result)
    sys.stdin.read()   # hold the memory until the parent has compared it
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
