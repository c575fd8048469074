"""The `backends` of a group, their health checks and the sorry server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

from ..core.spec import MAX_WEIGHT, SORRY_SERVER, BackendSpec, HealthCheckSpec, is_ip
from .ports import GroupPorts, _port_map
from .validator import _list_of, _scalars, _Validator
from .values import (
    _backend_address,
    _bool,
    _choice,
    _duration,
    _hex_id,
    _int_in,
    _ip,
    _name,
    _port,
    _positive_duration,
    _regex,
    _status_range,
    _text,
    _url_path,
)

_BACKEND_KEYS = (
    "name",
    "address",
    "weight",
    "ports",
    "max_conns",
    "inhibit_on_failure",
    "health_check",
    "state",
    "send_proxy",
    "slow_start",
    "resolve",
    "backup",
    "server_id",
)
_CHECK_COMMON = ("type", "interval", "timeout", "rise", "fall", "port")
_CHECK_KEYS = {
    "tcp": ("send", "expect"),
    "http": ("path", "status", "body", "host"),
    "tls": ("verify", "server_name", "path", "status", "body", "host"),
    "exec": ("command",),
    "udp": ("send", "expect"),
}


def _health_check(
    v: _Validator, node: yaml.Node, path: str, ports: GroupPorts
) -> HealthCheckSpec | None:
    every = _CHECK_COMMON + tuple(k for keys in _CHECK_KEYS.values() for k in keys)
    m = v.mapping(node, path, tuple(dict.fromkeys(every)))
    if m is None:
        return None
    if "type" not in m:
        v.error(node, path, f"missing required key 'type' ({' | '.join(_CHECK_KEYS)})")
        return None
    kind = v.field(m["type"][1], f"{path}.type", _choice(*_CHECK_KEYS))
    if kind is None:
        return None
    ok = True
    for key, (knode, _) in m.items():
        if key not in _CHECK_COMMON and key not in _CHECK_KEYS[kind]:
            v.error(knode, f"{path}.{key}", f"not used by a {kind} check")
            ok = False

    def group_port(x: Any) -> int:
        # A udp check probes the backend's UDP port of that number, any other its TCP port.
        p = _port(x)
        if p not in ports.tcp and p not in ports.udp:
            raise ValueError(f"{p} is not among the group's ports ({ports.text()})")
        return p

    kw: dict[str, Any] = {"type": kind}
    checks: dict[str, Callable[[Any], Any]] = {
        "interval": _positive_duration,
        "timeout": _positive_duration,
        "rise": _int_in(1, 1000),
        "fall": _int_in(1, 1000),
        "port": group_port,
        "send": _text,
        "expect": _regex,
        "path": _url_path,
        "body": _text,
        "host": _text,
        "verify": _bool,
        "server_name": _text,
    }
    ok = _scalars(v, m, path, checks, kw) and ok
    if "status" in m:
        status = _list_of(v, m["status"][1], f"{path}.status", _status_range)
        ok = ok and status is not None
        kw["status"] = tuple(code for codes in status or () for code in codes)
    if kind == "exec":
        if "command" not in m:
            v.error(node, path, "an exec check needs 'command' (a list: program and arguments)")
            return None
        command = _list_of(v, m["command"][1], f"{path}.command", _text)
        ok = ok and command is not None
        kw["command"] = tuple(command or ())
    if kind == "udp":
        if not ports.udp:
            v.error(m["type"][1], f"{path}.type", "a udp check needs one of the group's UDP ports")
            return None
        if "port" in kw and kw["port"] not in ports.udp:
            v.error(
                m["port"][1], f"{path}.port", f"{kw['port']} is not among the group's UDP ports"
            )
            return None
    if kind == "http" and "path" not in kw:
        kw["path"] = "/"
    return HealthCheckSpec(**kw) if ok else None


def _backend(v: _Validator, node: yaml.Node, path: str, ports: GroupPorts) -> BackendSpec | None:
    m = v.mapping(node, path, _BACKEND_KEYS)
    if m is None:
        return None
    ok = True
    for required in ("name", "address"):
        if required not in m:
            v.error(node, path, f"missing required key {required!r}")
            ok = False
    kw: dict[str, Any] = {}
    checks: dict[str, Callable[[Any], Any]] = {
        "name": _name,
        "address": _backend_address,
        "weight": _int_in(0, MAX_WEIGHT),
        "max_conns": _int_in(0, 10_000_000),
        "inhibit_on_failure": _bool,
        "backup": _bool,
        "state": _choice("up", "drain", "disabled"),
        "send_proxy": _choice("v1", "v2", "none"),
        "slow_start": _duration,
        "resolve": _choice("all", "first"),
    }
    ok = _scalars(v, m, path, checks, kw) and ok
    if "server_id" in m:
        # Read as written: YAML would make an unquoted 0b11 the number 3, or 1234 an int
        sid = m["server_id"][1]
        written = sid.value if isinstance(sid, yaml.ScalarNode) and sid.style is None else None
        kw["server_id"] = v.field(sid, f"{path}.server_id", lambda x: _hex_id(written or x))
        ok = ok and kw["server_id"] is not None
    inline_port: int | None = None
    if isinstance(kw.get("address"), tuple):
        kw["address"], inline_port = kw["address"]
    if "resolve" in kw and "address" in kw and is_ip(kw["address"]):
        v.error(m["resolve"][1], f"{path}.resolve", "applies to a DNS name, not an IP address")
        ok = False
    if "ports" in m:
        if inline_port is not None:
            v.error(
                m["ports"][1],
                f"{path}.ports",
                "the address already gives a port: give it there or in a ports map, not both",
            )
            ok = False
        pm = _port_map(v, m["ports"][1], f"{path}.ports", ports)
        ok = ok and pm is not None
        kw["ports"], kw["udp_ports"] = pm or ({}, {})
    elif inline_port is not None and (ports.tcp or ports.udp):
        # The port is the first service port's; the others keep the same offset (as `-b`),
        # UDP ports alike.
        first = ports.tcp[0] if ports.tcp else ports.udp[0]
        offset = inline_port - first
        bad = [sp for sp in ports.tcp + ports.udp if not 1 <= sp + offset <= 65535]
        if bad:
            v.error(
                m["address"][1],
                f"{path}.address",
                f"port {inline_port} for {first} puts {bad[0]} at {bad[0] + offset},"
                " outside 1-65535: give a ports map",
            )
            ok = False
        else:
            kw["ports"] = {sp: sp + offset for sp in ports.tcp}
            kw["udp_ports"] = {sp: sp + offset for sp in ports.udp}
    if "health_check" in m:
        hc = _health_check(v, m["health_check"][1], f"{path}.health_check", ports)
        ok = ok and hc is not None
        kw["health_check"] = hc
    if not ok:
        return None
    return BackendSpec(**kw)


def _sorry_server(
    v: _Validator, node: yaml.Node, path: str, ports: GroupPorts
) -> BackendSpec | None:
    m = v.mapping(node, path, ("address", "ports"))
    if m is None:
        return None
    if "address" not in m:
        v.error(node, path, "missing required key 'address'")
        return None
    address = v.field(m["address"][1], f"{path}.address", _ip)
    maps: tuple[dict[int, int], dict[int, int]] | None = ({}, {})
    if "ports" in m:
        maps = _port_map(v, m["ports"][1], f"{path}.ports", ports)
    if address is None or maps is None:
        return None
    v.nodes[path] = node
    return BackendSpec(name=SORRY_SERVER, address=address, ports=maps[0], udp_ports=maps[1])


def _passive(v: _Validator, node: yaml.Node, path: str) -> int | None:
    m = v.mapping(node, path, ("failures",))
    if m is None:
        return None
    if "failures" not in m:
        return 3
    return v.field(m["failures"][1], f"{path}.failures", _int_in(0, 1000))


def _backends(
    v: _Validator, node: yaml.Node, path: str, ports: GroupPorts
) -> tuple[BackendSpec, ...] | None:
    items = v.sequence(node, path)
    if items is None:
        return None
    ok = True
    backends: list[BackendSpec] = []
    names: set[str] = set()
    for i, item in enumerate(items):
        b = _backend(v, item, f"{path}[{i}]", ports)
        if b is not None:
            v.nodes[f"{path}[{i}]"] = item
        if b is None:
            ok = False
        elif b.name in names:
            v.error(item, f"{path}[{i}].name", f"backend name {b.name!r} is used twice")
            ok = False
        else:
            names.add(b.name)
            backends.append(b)
    if not items:
        v.error(node, path, "must list at least one backend")
        ok = False
    return tuple(backends) if ok else None
