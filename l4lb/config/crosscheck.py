"""Checks across groups, made once every group has parsed: listeners that overlap, and backends
that would lead back to one of l4lb's own listeners (they bind probe sockets to tell)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator

from ..core.local import is_local_address
from ..core.spec import GroupSpec, KernelMarksSpec
from .ports import GroupPorts
from .validator import _Validator


def _listen_overlaps(a: GroupSpec, b: GroupSpec) -> Iterator[tuple[str, str]]:
    """(address, ports) that two groups would both bind (a kernel-mark group binds none); a
    TCP and a UDP port of one number do not overlap."""
    if a.kernel_mark is not None or b.kernel_mark is not None:
        return
    tcp = sorted(set(a.ports) & set(b.ports))
    udp = sorted(set(a.udp_ports) & set(b.udp_ports))
    if not tcp and not udp:
        return
    common = GroupPorts(tuple(tcp), tuple(udp)).text()
    for x in a.listen:
        for y in b.listen:
            xa, ya = ipaddress.ip_address(x), ipaddress.ip_address(y)
            if x == y or (xa.version == ya.version and (xa.is_unspecified or ya.is_unspecified)):
                yield (x, common)


def _own_listeners(
    groups: list[GroupSpec], marks: KernelMarksSpec | None, udp: bool = False
) -> set[tuple[str, int]]:
    if udp:
        return {(a, p) for g in groups for a in g.listen for p in g.udp_ports}
    out = {(a, p) for g in groups if g.kernel_mark is None for a in g.listen for p in g.ports}
    if marks is not None:
        out.add((marks.host, marks.port))
    return out


def _loops_back(
    target: tuple[str, int], listeners: set[tuple[str, int]], is_local: Callable[[str], bool]
) -> tuple[str, int] | None:
    """The listener of l4lb's own that a backend at `target` would reach, if any: the same
    address and port, or a wildcard one on that port when the address is this host's (a `::`
    listener takes IPv4 clients too)."""
    address, port = target
    if target in listeners:
        return target
    v4 = ":" not in address
    for wildcard in ("0.0.0.0", "::") if v4 else ("::",):
        if (wildcard, port) in listeners and is_local(address):
            return (wildcard, port)
    return None


def _check_loops(v: _Validator, groups: list[GroupSpec], marks: KernelMarksSpec | None) -> None:
    """A backend that is one of l4lb's own listeners would make every connection loop through
    l4lb until the descriptors run out: an error at the backend's line."""
    listeners = _own_listeners(groups, marks)
    udp_listeners = _own_listeners(groups, marks, udp=True)
    local: dict[str, bool] = {}

    def is_local(address: str) -> bool:
        if address not in local:
            local[address] = is_local_address(address)
        return local[address]

    for g in groups:
        named = [(f"groups.{g.name}.backends[{i}]", b) for i, b in enumerate(g.backends)]
        if g.sorry_server is not None:
            named.append((f"groups.{g.name}.sorry_server", g.sorry_server))
        for path, b in named:
            if b.is_name:
                continue  # known once resolved: the run-time loop watch covers names
            targets = [(b.port_for(sp), "", listeners) for sp in g.ports]
            targets += [(b.udp_port_for(sp), "/udp", udp_listeners) for sp in g.udp_ports]
            for port, proto, ours in targets:
                hit = _loops_back((b.address, port), ours, is_local)
                if hit is not None:
                    host = f"[{hit[0]}]" if ":" in hit[0] else hit[0]
                    v.error(
                        v.nodes.get(path),
                        f"{path}.address",
                        f"{b.address} port {port}{proto} is l4lb's own listener"
                        f" {host}:{hit[1]}{proto}: connections would loop through l4lb"
                        " (give the backend its real address, or a ports map)",
                    )
                    break
