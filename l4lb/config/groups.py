"""One group (`groups.NAME`): its keys, persistence, PROXY, connection log and client limits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

from ..core.quiclb import MAX_CONFIG_ID, Codec
from ..core.spec import (
    AcceptProxySpec,
    AccessLogSpec,
    ClientLimitsSpec,
    GroupSpec,
    PersistenceSpec,
    QuicLbSpec,
)
from .backends import _backends, _health_check, _passive, _sorry_server
from .ports import GroupPorts, _ports
from .validator import _list_of, _scalars, _Validator
from .values import (
    _beside,
    _bool,
    _choice,
    _cidr,
    _duration,
    _int_in,
    _ip,
    _positive_duration,
    _rate,
    _scheduler,
    _source,
    _text,
    parse_netmask,
)

_GROUP_KEYS = (
    "mark",
    "listen",
    "ports",
    "scheduler",
    "persistence",
    "connect_timeout",
    "idle_timeout",
    "backends",
    "health_check",
    "passive",
    "sorry_server",
    "quorum",
    "hysteresis",
    "on_down",
    "on_up",
    "queue_timeout",
    "notify",
    "relay",
    "send_proxy",
    "accept_proxy",
    "kernel_mark",
    "client_limits",
    "slow_start",
    "access_log",
    "udp_idle_timeout",
    "udp_max_flows",
    "allow",
    "deny",
    "source",
    "quic_lb",
)
_PERSIST_KEYS = ("timeout", "netmask", "ipv6_prefix", "max_entries")


def _persistence(v: _Validator, node: yaml.Node, path: str) -> PersistenceSpec:
    m = v.mapping(node, path, _PERSIST_KEYS)
    if m is None:
        return PersistenceSpec()
    kw: dict[str, Any] = {}
    checks: dict[str, Callable[[Any], Any]] = {
        "timeout": _duration,
        "netmask": parse_netmask,
        "ipv6_prefix": _int_in(0, 128),
        "max_entries": _int_in(1, 100_000_000),
    }
    _scalars(v, m, path, checks, kw)
    return PersistenceSpec(**kw)


def _accept_proxy(v: _Validator, node: yaml.Node, path: str) -> AcceptProxySpec | None:
    m = v.mapping(node, path, ("trusted", "timeout"))
    if m is None:
        return None
    if "trusted" not in m:
        v.error(
            node, path, "missing required key 'trusted' (the networks PROXY headers may come from)"
        )
        return None
    trusted = _list_of(v, m["trusted"][1], f"{path}.trusted", _cidr)
    timeout = (
        v.field(m["timeout"][1], f"{path}.timeout", _positive_duration) if "timeout" in m else 3.0
    )
    if trusted is None or timeout is None:
        return None
    return AcceptProxySpec(tuple(trusted), timeout)


_LOG_OFF = AccessLogSpec(path="")  # a group's `access_log: off`, until resolved to None


def _access_log(v: _Validator, node: yaml.Node, path: str) -> AccessLogSpec | None:
    """A mapping, or `off` (a group that logs nothing while the others do)."""
    if isinstance(node, yaml.ScalarNode) and node.value in ("off", "false"):
        return _LOG_OFF
    m = v.mapping(node, path, ("path", "format", "log_on_connect"))
    if m is None:
        return None
    kw: dict[str, Any] = {}
    checks: dict[str, Callable[[Any], Any]] = {
        "path": _text,
        "format": _choice("json", "text"),
        "log_on_connect": _bool,
    }
    if not _scalars(v, m, path, checks, kw):
        return None
    if kw.get("path") not in (None, "stdout", "stderr"):
        kw["path"] = _beside(v.source, kw["path"])
    return AccessLogSpec(**kw)


def _client_limits(v: _Validator, node: yaml.Node, path: str) -> ClientLimitsSpec | None:
    m = v.mapping(node, path, ("max_conns", "rate", "burst"))
    if m is None:
        return None
    kw: dict[str, Any] = {}
    checks: dict[str, Callable[[Any], Any]] = {
        "max_conns": _int_in(1, 10_000_000),
        "rate": _rate,
        "burst": _int_in(1, 10_000_000),
    }
    if not _scalars(v, m, path, checks, kw):
        return None
    if not kw.keys() & {"max_conns", "rate"}:
        v.error(node, path, "needs max_conns, rate, or both")
        return None
    if "burst" in kw and "rate" not in kw:
        v.error(m["burst"][0], f"{path}.burst", "goes with a rate")
        return None
    if "rate" in kw:
        # Default burst: one second's worth (at least one connection).
        kw["burst"] = float(kw.get("burst", max(1.0, float(int(kw["rate"] + 0.999)))))
    return ClientLimitsSpec(**kw)


def _quic_lb(v: _Validator, node: yaml.Node, path: str) -> QuicLbSpec | None:
    keys = ("server_id_length", "nonce_length", "config_id", "key_file")
    m = v.mapping(node, path, keys)
    if m is None:
        return None
    ok = True
    for required in keys[:2]:
        if required not in m:
            v.error(node, path, f"missing required key {required!r}")
            ok = False
    kw: dict[str, Any] = {}
    checks: dict[str, Callable[[Any], Any]] = {
        "server_id_length": _int_in(1, 15),
        "nonce_length": _int_in(4, 18),
        "config_id": _int_in(0, MAX_CONFIG_ID),
        "key_file": _text,
    }
    if not (_scalars(v, m, path, checks, kw) and ok):
        return None
    if kw["server_id_length"] + kw["nonce_length"] > 19:
        v.error(
            node,
            path,
            "server_id_length and nonce_length sum to at most 19 (a QUIC v1 connection ID is"
            " 20 octets with its first)",
        )
        return None
    if "key_file" in kw:
        kw["key_file"] = _beside(v.source, kw["key_file"])
        kw["key"] = _quic_key(v, m["key_file"][1], f"{path}.key_file", kw["key_file"])
        if kw["key"] is None:
            return None
    spec = QuicLbSpec(**kw)
    Codec(spec.config_id, spec.server_id_length, spec.nonce_length, spec.key)  # (it loads)
    return spec


def _quic_key(v: _Validator, node: yaml.Node, path: str, file: str) -> bytes | None:
    """The 16-octet AES-128 key in `file`: 32 hex digits (whitespace and a 0x aside)."""
    try:
        text = v.read(file).decode(errors="replace")
    except OSError as exc:
        v.error(node, path, f"cannot read {file}: {exc.strerror}")
        return None
    digits = "".join(text.split()).lower().removeprefix("0x")
    try:
        key = bytes.fromhex(digits)
    except ValueError:
        key = b""
    if len(key) != 16:
        v.error(node, path, f"{file} must hold a 16-octet AES-128 key as 32 hex digits")
        return None
    return key


def _addresses(v: _Validator, node: yaml.Node, path: str) -> tuple[str, ...] | None:
    items = v.sequence(node, path)
    if items is None:
        return None
    listen: list[str] = []
    ok = True
    for i, item in enumerate(items):
        addr = v.field(item, f"{path}[{i}]", _ip)
        if addr is None:
            ok = False
        elif addr in listen:
            v.error(item, f"{path}[{i}]", f"{addr} is listed twice")
            ok = False
        else:
            listen.append(addr)
    if not items:
        v.error(node, path, "must list at least one address")
        ok = False
    return tuple(listen) if ok else None


# A group's scalar keys and their parsers.
_GROUP_SCALARS: dict[str, Callable[[Any], Any]] = {
    "mark": _int_in(1, 2**32 - 1),
    "scheduler": _scheduler,
    "connect_timeout": _positive_duration,
    "idle_timeout": _duration,
    "quorum": _int_in(1, 100_000),
    "hysteresis": _int_in(0, 100_000),
    "on_down": _choice("keep", "close"),
    "on_up": _choice("stay", "return"),
    "queue_timeout": _duration,
    "relay": _choice("copy", "auto", "splice"),
    "send_proxy": _choice("v1", "v2"),
    "kernel_mark": _int_in(1, 2**32 - 1),
    "slow_start": _duration,
    "udp_idle_timeout": _positive_duration,
    "udp_max_flows": _int_in(1, 10_000_000),
    "source": _source,
}


def _group(v: _Validator, name: str, node: yaml.Node, index: int) -> GroupSpec | None:
    path = f"groups.{name}"
    m = v.mapping(node, path, _GROUP_KEYS)
    if m is None:
        return None
    ok = True
    kw: dict[str, Any] = {"mark": index + 1}
    for required in ("ports", "backends"):
        if required not in m:
            v.error(node, path, f"missing required key {required!r}")
            ok = False
    ok = _scalars(v, m, path, _GROUP_SCALARS, kw) and ok
    if "listen" in m:
        listen = _addresses(v, m["listen"][1], f"{path}.listen")
        ok = ok and listen is not None
        kw["listen"] = listen
    ports = GroupPorts((), ())
    if "ports" in m:
        got = _ports(v, m["ports"][1], f"{path}.ports")
        ok = ok and got is not None
        ports = got or ports
    kw["ports"], kw["udp_ports"] = ports
    if "persistence" in m:
        kw["persistence"] = _persistence(v, m["persistence"][1], f"{path}.persistence")

    def notify(node: yaml.Node, p: str) -> tuple[str, ...] | None:
        argv = _list_of(v, node, p, _text)
        return None if argv is None else tuple(argv)

    def networks(node: yaml.Node, p: str) -> tuple[tuple[int, int, int], ...] | None:
        nets = _list_of(v, node, p, _cidr)
        return None if nets is None else tuple(nets)

    # key -> (GroupSpec field, parser of the key's node); a parser reports its own errors.
    sections: dict[str, tuple[str, Callable[[yaml.Node, str], Any]]] = {
        "backends": ("backends", lambda node, p: _backends(v, node, p, ports)),
        "health_check": ("health_check", lambda node, p: _health_check(v, node, p, ports)),
        "passive": ("passive_failures", lambda node, p: _passive(v, node, p)),
        "sorry_server": ("sorry_server", lambda node, p: _sorry_server(v, node, p, ports)),
        "notify": ("notify", notify),
        "accept_proxy": ("accept_proxy", lambda node, p: _accept_proxy(v, node, p)),
        "client_limits": ("client_limits", lambda node, p: _client_limits(v, node, p)),
        "access_log": ("access_log", lambda node, p: _access_log(v, node, p)),
        "allow": ("allow", networks),
        "deny": ("deny", networks),
        "quic_lb": ("quic_lb", lambda node, p: _quic_lb(v, node, p)),
    }
    for key, (field_name, parse) in sections.items():
        if key in m:
            value = parse(m[key][1], f"{path}.{key}")
            ok = ok and value is not None
            kw[field_name] = value
    if not ok:
        return None
    group = GroupSpec(name=name, **kw)
    return group if _consistent(v, group, m, path) else None


def _consistent(
    v: _Validator, group: GroupSpec, m: dict[str, tuple[yaml.Node, yaml.Node]], path: str
) -> bool:
    """What no single key can tell: an error (False) or a warning on the group as a whole."""
    if group.udp_ports and group.kernel_mark is not None:
        v.error(
            m["ports"][1],
            f"{path}.ports",
            "a kernel_mark group is TCP only (its traffic comes through the kernel_marks"
            " listener): move the UDP ports to a group of their own",
        )
        return False
    if len(group.ports) + len(group.udp_ports) > 1 and not group.persistence.enabled:
        v.warn(
            m["ports"][1],
            f"{path}.ports",
            "persistence is off, so one client's connections to these ports may reach"
            " different backends",
        )
    if "quorum" in m and group.sorry_server is None:
        v.warn(m["quorum"][1], f"{path}.quorum", "has no effect without a sorry_server")
    return _server_ids(v, group, m, path)


def _server_ids(
    v: _Validator, group: GroupSpec, m: dict[str, tuple[yaml.Node, yaml.Node]], path: str
) -> bool:
    """QUIC-LB: every backend has a server ID of the configured length, no two alike; and
    neither a server ID nor quic_lb without the other (or without a UDP port)."""
    quic = group.quic_lb
    if quic is not None and not group.udp_ports:
        v.error(
            m["quic_lb"][0],
            f"{path}.quic_lb",
            'routes QUIC: the group needs a UDP port ("443/udp")',
        )
        return False
    seen: dict[str, str] = {}
    for i, b in enumerate(group.backends):
        where = f"{path}.backends[{i}]"
        node = v.nodes.get(where)
        if quic is None:
            if b.server_id:
                v.error(node, f"{where}.server_id", "has no use without the group's quic_lb")
                return False
            continue
        want = quic.server_id_length
        if not b.server_id:
            v.error(node, where, f"needs a server_id ({want} octets in hex): the group has quic_lb")
            return False
        if len(b.server_id) != 2 * want:
            v.error(
                node,
                f"{where}.server_id",
                f"{b.server_id} is {len(b.server_id) // 2} octets;"
                f" quic_lb.server_id_length is {want}",
            )
            return False
        if b.is_name and b.resolve == "all":
            v.error(
                node,
                f"{where}.resolve",
                f"{b.address} may resolve to several servers, and a server ID names one:"
                " give resolve: first, or an address",
            )
            return False
        if b.server_id in seen:
            v.error(
                node, f"{where}.server_id", f"{b.server_id} is also backend {seen[b.server_id]}'s"
            )
            return False
        seen[b.server_id] = b.name
    return True
