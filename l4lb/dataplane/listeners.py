"""Listening sockets, built by hand so that the options are ours: SO_REUSEADDR, a large backlog,
and an explicit IPV6_V6ONLY choice; UDP ones with the packet-info option that tells a wildcard
socket which address a datagram was sent to (so the answer leaves from it)."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass

from ..core.spec import Config

BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
MARKS = "*kernel-marks*"  # the group name of the kernel_marks listener
IP_PKTINFO = 8  # linux/in.h (Python's socket module leaves it out before 3.12)


Where = tuple[str, int, str]  # (address, port, "tcp" | "udp"): one listening socket


@dataclass(frozen=True, slots=True)
class ListenSpec:
    group: str
    host: str
    port: int
    v6only: bool
    proto: str = "tcp"

    @property
    def where(self) -> Where:
        return (self.host, self.port, self.proto)

    def __str__(self) -> str:
        hp = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return hp if self.proto == "tcp" else f"{hp}/udp"


def listen_specs(config: Config) -> list[ListenSpec]:
    """Every (group, address, port) to bind. '::' is dual-stack (IPv4 clients arrive as
    ::ffff:a.b.c.d) unless some group also binds IPv4 on that port, where it must be v6-only."""
    v4_ports = {p for g in config.groups for h in g.listen if ":" not in h for p in g.ports}
    v4_udp = {p for g in config.groups for h in g.listen if ":" not in h for p in g.udp_ports}
    out = []
    if config.kernel_marks is not None:
        km = config.kernel_marks
        out.append(ListenSpec(MARKS, km.host, km.port, ":" in km.host))
    for g in config.groups:
        if g.kernel_mark is not None:
            continue  # its traffic arrives on the kernel_marks listener
        for port in g.ports:
            for host in g.listen:
                v6only = ":" in host and (host != "::" or port in v4_ports)
                out.append(ListenSpec(g.name, host, port, v6only))
        for port in g.udp_ports:
            for host in g.listen:
                v6only = ":" in host and (host != "::" or port in v4_udp)
                out.append(ListenSpec(g.name, host, port, v6only, "udp"))
    return out


def steering_masks(config: Config, spec: ListenSpec) -> tuple[int, int] | None:
    """(IPv4 mask, IPv6 prefix) that workers are chosen by on this listener: its group's
    persistence key, so that one client reaches one worker (and one affinity table) on every
    port of the group. The kernel-marks listener serves several groups: it takes the coarsest
    of their keys, which still keeps each group's keys whole. None: no persistence, so the
    kernel's own 4-tuple hash spreads the load better."""
    if spec.group == MARKS:
        groups = [g for g in config.groups if g.kernel_mark is not None]
    else:
        groups = [g for g in config.groups if g.name == spec.group]
    keyed = [g.persistence for g in groups if g.persistence.enabled]
    if not keyed:
        return None
    v4 = 0xFFFFFFFF
    for p in keyed:
        v4 &= p.netmask
    return v4, min(p.ipv6_prefix for p in keyed)


def is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


IP_FREEBIND, IPV6_FREEBIND = 15, 78


def bind(
    spec: ListenSpec, backlog: int = BACKLOG, reuseport: bool = False, freebind: bool = False
) -> socket.socket:
    family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
    udp = spec.proto == "udp"
    sock = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(spec.v6only))
        if freebind:  # (an HA pair's standby listens on the address before it holds it)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        if udp and is_wildcard(spec.host):
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        if udp:
            # Bursts queue in the kernel while the loop is busy; the default (208 KiB) holds
            # about 300 full-size datagrams.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((spec.host, spec.port))
        if not udp:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def close_all(socks: Iterable[socket.socket]) -> None:
    for s in socks:
        s.close()
