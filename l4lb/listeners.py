"""Listening sockets, built by hand so that the options are ours: SO_REUSEADDR, a large backlog,
and an explicit IPV6_V6ONLY choice."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass

from .config import Config

BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
MARKS = "*kernel-marks*"  # the group name of the kernel_marks listener


@dataclass(frozen=True, slots=True)
class ListenSpec:
    group: str
    host: str
    port: int
    v6only: bool

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def listen_specs(config: Config) -> list[ListenSpec]:
    """Every (group, address, port) to bind. '::' is dual-stack (IPv4 clients arrive as
    ::ffff:a.b.c.d) unless some group also binds IPv4 on that port, where it must be v6-only."""
    v4_ports = {p for g in config.groups for h in g.listen if ":" not in h for p in g.ports}
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
    return out


def bind(spec: ListenSpec, backlog: int = BACKLOG) -> socket.socket:
    family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(spec.v6only))
        sock.bind((spec.host, spec.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def close_all(socks: Iterable[socket.socket]) -> None:
    for s in socks:
        s.close()
