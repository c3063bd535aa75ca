"""The emulated migration link: two network namespaces joined by a veth pair, shaped by TBF.

    with Link(rate_bps=1e9) as link:
        ...  # link.source_ns / link.target_ns, addresses SOURCE_ADDR / TARGET_ADDR

Everything created carries the prefix `uffdm` and the creator's pid (namespaces
`uffdm-<pid>-<n>-src|dst`, veth ends `um<pid>x<n>s|t`, n counting the links of the process),
so a run killed before it could clean up is recognised later: `remove_leftovers()` (called
by every `Link`) deletes those whose creator is dead. Removing a namespace destroys the veth
end in it, and so the pair. The kernel here has no netem, so one-way delay is not part of
the link: the migration's receivers add it in user space (see migration.c).
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import threading
import time
from types import TracebackType

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from uffdtrace.errors import UserError

PREFIX = "uffdm"
SOURCE_ADDR = "10.77.0.1"
TARGET_ADDR = "10.77.0.2"
PREFIXLEN = 24
TBF_LATENCY = "50ms"      # queue limit of the TBF, as the time to drain it at the rate
NS_PATTERN = re.compile(rf"^{PREFIX}-(\d+)-\d+-(src|dst)$")
VETH_PATTERN = re.compile(r"^um(\d+)x\d+[st]$")
_serial = itertools.count()   # several links in one process get distinct names


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers() -> list[str]:
    """Namespaces and root-namespace veth ends of this tool whose creator pid is dead."""
    found = [n for n in netns.listnetns()
             if (m := NS_PATTERN.match(n)) and not _alive(int(m.group(1)))]
    with IPRoute() as ip:
        found += [name for link in ip.get_links()
                  if (name := link.get_attr("IFLA_IFNAME"))
                  and (m := VETH_PATTERN.match(name)) and not _alive(int(m.group(1)))]
    return found


def remove_leftovers() -> list[str]:
    """Delete what earlier, killed runs left behind; returns the names removed."""
    removed = leftovers()
    for name in removed:
        if NS_PATTERN.match(name):
            netns.remove(name)
        else:
            with IPRoute() as ip:
                ip.link("del", ifname=name)
    return removed


def tbf_burst(rate_bps: float) -> int:
    """Bucket size: 1 ms at the rate, and at least two 64 KiB GSO packets."""
    return max(int(rate_bps / 8 / 1000), 2 * 65536)


class Link:
    """Source and target namespaces, veth pair, addresses, MTU and a TBF on both ends."""

    def __init__(self, rate_bps: float, mtu: int = 1500, pid: int | None = None) -> None:
        self.rate_bps = rate_bps
        self.mtu = mtu
        self.pid = os.getpid() if pid is None else pid
        n = next(_serial) % 1000
        self.source_ns = f"{PREFIX}-{self.pid}-{n}-src"
        self.target_ns = f"{PREFIX}-{self.pid}-{n}-dst"
        self.source_if = f"um{self.pid}x{n}s"
        self.target_if = f"um{self.pid}x{n}t"
        self.removed_leftovers: list[str] = []

    def __enter__(self) -> Link:
        self.removed_leftovers = remove_leftovers()
        if self.source_ns in netns.listnetns() or self.target_ns in netns.listnetns():
            raise UserError(f"namespace {self.source_ns} or {self.target_ns} already exists and "
                            f"its creator (pid {self.pid}) is alive: remove it with "
                            f"`ip netns del` if it is stale")
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()

    def _create(self) -> None:
        netns.create(self.source_ns)
        netns.create(self.target_ns)
        with IPRoute() as ip:
            try:
                ip.link("add", ifname=self.source_if, kind="veth", peer=self.target_if)
            except NetlinkError as e:
                raise UserError(f"cannot create veth pair {self.source_if}: {e}") from e
            for ifname, ns in ((self.source_if, self.source_ns), (self.target_if, self.target_ns)):
                ip.link("set", index=ip.link_lookup(ifname=ifname)[0], net_ns_fd=ns)
        burst = tbf_burst(self.rate_bps)
        for ns, ifname, addr in ((self.source_ns, self.source_if, SOURCE_ADDR),
                                 (self.target_ns, self.target_if, TARGET_ADDR)):
            with IPRoute(netns=ns) as ip:
                ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
                index = ip.link_lookup(ifname=ifname)[0]
                try:
                    ip.link("set", index=index, mtu=self.mtu)
                except NetlinkError as e:
                    raise UserError(f"MTU {self.mtu} refused by veth: {e}") from e
                ip.addr("add", index=index, address=addr, prefixlen=PREFIXLEN)
                ip.link("set", index=index, state="up")
                ip.tc("add", "tbf", index, rate=f"{int(self.rate_bps)}bit", burst=burst,
                      latency=TBF_LATENCY)

    def remove(self) -> None:
        """Delete the namespaces (and so the veth pair); idempotent."""
        existing = set(netns.listnetns())
        for ns in (self.source_ns, self.target_ns):
            if ns in existing:
                netns.remove(ns)
        with IPRoute() as ip:   # a veth end not yet moved into its namespace
            for ifname in (self.source_if, self.target_if):
                if ip.link_lookup(ifname=ifname):
                    ip.link("del", ifname=ifname)


def socket_in(ns: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A new IPv4 socket that belongs to namespace `ns` (made in a thread that joins it)."""
    made: list[socket.socket | BaseException] = []

    def work() -> None:
        try:
            netns.setns(ns, flags=0)
            made.append(socket.socket(socket.AF_INET, kind))
        except BaseException as e:
            made.append(e)

    thread = threading.Thread(target=work, name=f"setns-{ns}")
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def measure_bandwidth(link: Link, nbytes: int, port: int = 7479) -> float:
    """Goodput in bit/s of one TCP bulk transfer of `nbytes` from source to target."""
    server = socket_in(link.target_ns)
    client = socket_in(link.source_ns)
    with server, client:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((TARGET_ADDR, port))
        server.listen(1)
        client.connect((TARGET_ADDR, port))
        conn, _ = server.accept()
        sender = threading.Thread(target=client.sendall, args=(bytes(nbytes),))
        sender.start()
        buf = bytearray(1 << 20)
        got = conn.recv_into(buf)
        start = time.monotonic()
        first = got
        while got < nbytes:
            n = conn.recv_into(buf)
            if not n:
                break
            got += n
        elapsed = time.monotonic() - start
        sender.join()
        conn.close()
    return (got - first) * 8 / elapsed
