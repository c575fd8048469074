"""A group's `ports`: numbers, ranges and `/udp` entries, and the port maps of its backends."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import yaml

from .validator import _Validator
from .values import _RANGE_RE, _port


def compact_ports(ports: Iterable[int]) -> str:
    """'21, 30000-30099': ports with runs written as ranges."""
    out: list[str] = []
    run: list[int] = []
    for p in sorted(ports):
        if run and p == run[-1] + 1:
            run.append(p)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [p]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ", ".join(out)


def _port_range(x: Any) -> range:
    """A port (80) or a range of ports ("30000-30099"), as a range."""
    if isinstance(x, str):
        m = _RANGE_RE.match(x)
        if m:
            first, last = int(m.group(1)), int(m.group(2))
            if not (1 <= first <= 65535 and 1 <= last <= 65535):
                raise ValueError(f"ports must be from 1 to 65535, got {x!r}")
            if last < first:
                raise ValueError(f"a range goes from low to high, got {x!r}")
            return range(first, last + 1)
        if x.strip().isdigit():
            x = int(x)
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError(f'expected a port or a range such as "30000-30099", got {x!r}')
    return range(_port(x), x + 1)


class GroupPorts(NamedTuple):
    """A group's service ports as its `ports` list gives them: TCP, and "N/udp"."""

    tcp: tuple[int, ...]
    udp: tuple[int, ...]

    def text(self) -> str:
        parts = [compact_ports(self.tcp)] if self.tcp else []
        if self.udp:
            parts.append(", ".join(f"{x}/udp" for x in compact_ports(self.udp).split(", ")))
        return ", ".join(parts)


def _port_entry(x: Any) -> tuple[range, str]:
    """A `ports` item: 80, "30000-30099", "443/udp", "53/tcp": its ports and protocol."""
    proto = "tcp"
    if isinstance(x, str):
        head, sep, tail = x.rpartition("/")
        if sep:
            if tail.strip().lower() not in ("tcp", "udp"):
                raise ValueError(f"the protocol in {x!r} must be tcp or udp")
            proto, x = tail.strip().lower(), head
    return _port_range(x), proto


def _port_map(
    v: _Validator, node: yaml.Node, path: str, ports: GroupPorts
) -> tuple[dict[int, int], dict[int, int]] | None:
    """Service port -> backend port, for TCP and for UDP ("443/udp": 8443); a range maps onto
    a range of the same size."""
    if not isinstance(node, yaml.MappingNode):
        v.error(node, path, "expected a mapping of service port to backend port")
        return None
    ok = True
    tcp: dict[int, int] = {}
    udp: dict[int, int] = {}
    for knode, vnode in node.value:
        kpath = f"{path}.{getattr(knode, 'value', '?')}"
        entry = v.field(knode, kpath, _port_entry)
        target = v.field(vnode, kpath, _port_range)
        if entry is None or target is None:
            ok = False
            continue
        service, proto = entry
        if len(service) != len(target):
            v.error(vnode, kpath, f"maps {len(service)} ports onto {len(target)}: sizes must match")
            ok = False
            continue
        group_ports, out = (ports.udp, udp) if proto == "udp" else (ports.tcp, tcp)
        missing = [p for p in service if p not in group_ports]
        if missing:
            hint = ""
            if proto == "tcp" and all(p in ports.udp for p in missing):
                hint = f' (a UDP port is mapped as "{compact_ports(missing)}/udp")'
            v.error(
                knode,
                kpath,
                f"{compact_ports(missing)}{'/udp' if proto == 'udp' else ''} not among the"
                f" group's ports ({ports.text()}){hint}",
            )
            ok = False
            continue
        for sp, bp in zip(service, target, strict=True):
            if sp in out:
                v.error(knode, kpath, f"service port {sp} is mapped twice")
                ok = False
                break
            out[sp] = bp
    return (tcp, udp) if ok else None


def _ports(v: _Validator, node: yaml.Node, path: str) -> GroupPorts | None:
    items = v.sequence(node, path)
    if items is None:
        return None
    ports: dict[str, list[int]] = {"tcp": [], "udp": []}
    seen: dict[str, set[int]] = {"tcp": set(), "udp": set()}
    ok = True
    for i, item in enumerate(items):
        entry = v.field(item, f"{path}[{i}]", _port_entry)
        if entry is None:
            ok = False
            continue
        rng, proto = entry
        twice = [p for p in rng if p in seen[proto]]
        if twice:  # an error, said once: the ports are still known, so that nothing that
            # names them (a backend's ports map, say) gets an error of its own from this one
            suffix = "/udp" if proto == "udp" else ""
            v.error(item, f"{path}[{i}]", f"port {compact_ports(twice)}{suffix} is listed twice")
        fresh = [p for p in rng if p not in seen[proto]]
        seen[proto].update(fresh)
        ports[proto].extend(fresh)
    if not items:
        v.error(node, path, "must list at least one port")
        ok = False
    return GroupPorts(tuple(ports["tcp"]), tuple(ports["udp"])) if ok else None
