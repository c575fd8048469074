"""A group's start-up line: where it listens, its backends and its persistence."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from ..core.keys import format_netmask
from ..core.spec import Config
from .ports import GroupPorts, compact_ports


class Listening(Protocol):
    """A listening socket as the line names it (`dataplane.listeners.ListenSpec`)."""

    @property
    def group(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def proto(self) -> str: ...


def describe(config: Config, listening: Iterable[Listening], group: str) -> str:
    """The start-up line of one group: where it listens, its backends and its persistence."""
    g = next(g for g in config.groups if g.name == group)
    p = g.persistence
    if p.enabled:
        mask = format_netmask(p.netmask)
        persist = f"persistence {p.timeout:g}s per {mask} (IPv6 /{p.ipv6_prefix})"
    else:
        persist = "persistence off"
    hosts: dict[str, tuple[list[int], list[int]]] = {}
    for s in listening:
        if s.group == g.name:
            tcp, udp = hosts.setdefault(f"[{s.host}]" if ":" in s.host else s.host, ([], []))
            (udp if s.proto == "udp" else tcp).append(s.port)
    where = "; ".join(
        f"{h} port(s) {GroupPorts(tuple(tcp), tuple(udp)).text()}"
        for h, (tcp, udp) in hosts.items()
    )
    km = config.kernel_marks
    if g.kernel_mark is not None and km is not None:
        covered = compact_ports(g.ports)
        where = f"firewall mark {g.kernel_mark} via {km.host}:{km.port} (ports {covered})"
    return (
        f"group {g.name} (mark {g.mark}): listening on {where}; {len(g.backends)} backends, "
        f"scheduler {g.scheduler}, {persist}"
    )
