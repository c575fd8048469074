"""Configuration: YAML in, frozen dataclasses out; each error is one line: file, line, field path.

The loader composes the YAML into nodes (which carry line numbers) and validates the node tree
directly, so an error can always name the line it comes from. Unknown keys, duplicate keys and
wrong types are errors; all errors of a file are reported, not only the first.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

SCHEDULERS = ("rr", "wrr", "lc", "wlc", "sh", "mh", "p2c", "fo")
DEFAULT_PERSISTENCE_TIMEOUT = 360.0  # keepalived's and ipvsadm's default
DEFAULT_MAX_ENTRIES = 1_000_000
MAX_WEIGHT = 65535  # ipvsadm's documented range
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(Exception):
    """A configuration that cannot be used; `lines` are ready to print, one per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass(frozen=True, slots=True)
class BackendSpec:
    name: str
    address: str  # a normalised IP literal
    weight: int = 1
    ports: Mapping[int, int] = field(default_factory=dict)  # service port -> backend port

    def port_for(self, service_port: int) -> int:
        return self.ports.get(service_port, service_port)


@dataclass(frozen=True, slots=True)
class PersistenceSpec:
    timeout: float = DEFAULT_PERSISTENCE_TIMEOUT  # seconds; 0 turns persistence off
    netmask: int = 0xFFFFFFFF  # IPv4 mask as an integer (need not be contiguous, as in LVS)
    ipv6_prefix: int = 128
    max_entries: int = DEFAULT_MAX_ENTRIES

    @property
    def enabled(self) -> bool:
        return self.timeout > 0


@dataclass(frozen=True, slots=True)
class GroupSpec:
    name: str
    mark: int
    ports: tuple[int, ...]
    backends: tuple[BackendSpec, ...]
    listen: tuple[str, ...] = ("0.0.0.0",)
    scheduler: str = "wlc"
    persistence: PersistenceSpec = field(default_factory=PersistenceSpec)
    connect_timeout: float = 2.0
    idle_timeout: float = 900.0


@dataclass(frozen=True, slots=True)
class Config:
    groups: tuple[GroupSpec, ...]
    shutdown_timeout: float = 10.0
    source: str = "<memory>"
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------- parsing helpers

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """'360s', '5m', '1.5h', '250ms', 30 or '30' (seconds) -> seconds. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 250ms")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _UNIT[m.group(2)]
    raise ValueError(f"expected a duration such as 30s, 5m or 250ms, got {value!r}")


def parse_netmask(value: object) -> int:
    """'255.255.255.0', '/24' or 24 -> a 32-bit mask. Dotted masks need not be contiguous."""
    if isinstance(value, int) and not isinstance(value, bool):
        prefix = value
    elif isinstance(value, str) and value.startswith("/") and value[1:].isdigit():
        prefix = int(value[1:])
    elif isinstance(value, str):
        try:
            return int(ipaddress.IPv4Address(value))
        except ValueError:
            raise ValueError(
                f"expected a netmask such as 255.255.255.0 or /24, got {value!r}"
            ) from None
    else:
        raise ValueError(f"expected a netmask such as 255.255.255.0 or /24, got {value!r}")
    if not 0 <= prefix <= 32:
        raise ValueError(f"prefix length must be 0 to 32, got {prefix}")
    return (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF


# --------------------------------------------------------------------------- the validator

T = TypeVar("T")


class _Invalid(Exception):
    """Raised inside a field check; turned into one error line by `_Validator.field`."""


class _Validator:
    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, node: yaml.Node | None, path: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        where = f"{path}: " if path else ""
        self.errors.append(f"{self.source}:{line}: {where}{message}")

    def warn(self, node: yaml.Node | None, path: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.warnings.append(f"{self.source}:{line}: {path}: warning: {message}")

    def mapping(
        self, node: yaml.Node, path: str, allowed: tuple[str, ...]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        """Key -> (key node, value node); reports non-mappings, unknown and duplicate keys."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, "expected a mapping")
            return None
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            key = knode.value if isinstance(knode, yaml.ScalarNode) else None
            sub = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str):
                self.error(knode, path, "keys must be plain strings")
            elif key in out:
                self.error(knode, sub, "duplicate key")
            elif allowed and key not in allowed:
                self.error(knode, sub, f"unknown key (expected one of: {', '.join(allowed)})")
            else:
                out[key] = (knode, vnode)
        return out

    def sequence(self, node: yaml.Node, path: str) -> list[yaml.Node] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, path, "expected a list")
            return None
        return list(node.value)

    def field(
        self,
        node: yaml.Node,
        path: str,
        check: Callable[[Any], T],
    ) -> T | None:
        """Run `check` on the scalar value of `node`; a ValueError becomes an error line."""
        if not isinstance(node, yaml.ScalarNode):
            self.error(node, path, "expected a single value")
            return None
        try:
            return check(_scalar(node))
        except (ValueError, _Invalid) as exc:
            self.error(node, path, str(exc))
            return None


_constructor = yaml.SafeLoader("")


def _scalar(node: yaml.ScalarNode) -> Any:
    return _constructor.construct_object(node)


def _int_in(lo: int, hi: int, what: str = "an integer") -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected {what} from {lo} to {hi}, got {v!r}")
        if not lo <= v <= hi:
            raise ValueError(f"must be from {lo} to {hi}, got {v}")
        return v

    return check


_port = _int_in(1, 65535, "a port number")


def _duration(v: Any) -> float:
    return parse_duration(v)


def _positive_duration(v: Any) -> float:
    d = parse_duration(v)
    if d <= 0:
        raise ValueError("must be greater than 0")
    return d


def _ip(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected an IP address, got {v!r}")
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ValueError(f"expected an IP address (IPv4 or IPv6 literal), got {v!r}") from None


def _name(v: Any) -> str:
    if not isinstance(v, str) or not _NAME_RE.match(v):
        raise ValueError(
            f"expected a name of letters, digits, '_', '.', '-' (at most 64), got {v!r}"
        )
    return v


def _scheduler(v: Any) -> str:
    if v not in SCHEDULERS:
        raise ValueError(f"expected one of {', '.join(SCHEDULERS)}, got {v!r}")
    return str(v)


# --------------------------------------------------------------------------- sections

_TOP_KEYS = ("groups", "shutdown_timeout")
_GROUP_KEYS = (
    "mark",
    "listen",
    "ports",
    "scheduler",
    "persistence",
    "connect_timeout",
    "idle_timeout",
    "backends",
)
_PERSIST_KEYS = ("timeout", "netmask", "ipv6_prefix", "max_entries")
_BACKEND_KEYS = ("name", "address", "weight", "ports")


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
    for key, check in checks.items():
        if key in m:
            value = v.field(m[key][1], f"{path}.{key}", check)
            if value is not None:
                kw[key] = value
    return PersistenceSpec(**kw)


def _backend(
    v: _Validator, node: yaml.Node, path: str, ports: tuple[int, ...]
) -> BackendSpec | None:
    m = v.mapping(node, path, _BACKEND_KEYS)
    if m is None:
        return None
    ok = True
    for required in ("name", "address"):
        if required not in m:
            v.error(node, path, f"missing required key {required!r}")
            ok = False
    name = v.field(m["name"][1], f"{path}.name", _name) if "name" in m else None
    address = v.field(m["address"][1], f"{path}.address", _ip) if "address" in m else None
    weight = 1
    if "weight" in m:
        w = v.field(m["weight"][1], f"{path}.weight", _int_in(0, MAX_WEIGHT))
        ok = ok and w is not None
        weight = w if w is not None else 1
    port_map: dict[int, int] = {}
    if "ports" in m:
        pm = m["ports"][1]
        if not isinstance(pm, yaml.MappingNode):
            v.error(pm, f"{path}.ports", "expected a mapping of service port to backend port")
            ok = False
        else:
            for knode, vnode in pm.value:
                kpath = f"{path}.ports.{getattr(knode, 'value', '?')}"
                sport = v.field(knode, kpath, _port)
                bport = v.field(vnode, kpath, _port)
                if sport is None or bport is None:
                    ok = False
                    continue
                if sport in port_map:
                    v.error(knode, kpath, "duplicate service port")
                    ok = False
                elif sport not in ports:
                    v.error(knode, kpath, f"{sport} is not one of the group's ports {list(ports)}")
                    ok = False
                port_map[sport] = bport
    if not ok or name is None or address is None:
        return None
    return BackendSpec(name=name, address=address, weight=weight, ports=port_map)


def _group(v: _Validator, name: str, node: yaml.Node, index: int) -> GroupSpec | None:
    path = f"groups.{name}"
    m = v.mapping(node, path, _GROUP_KEYS)
    if m is None:
        return None
    ok = True
    kw: dict[str, Any] = {}
    if "mark" in m:
        mark = v.field(m["mark"][1], f"{path}.mark", _int_in(1, 2**32 - 1))
        ok = ok and mark is not None
        kw["mark"] = mark
    else:
        kw["mark"] = index + 1
    if "listen" in m:
        items = v.sequence(m["listen"][1], f"{path}.listen")
        listen: list[str] = []
        for i, item in enumerate(items or []):
            addr = v.field(item, f"{path}.listen[{i}]", _ip)
            if addr is None:
                ok = False
            elif addr in listen:
                v.error(item, f"{path}.listen[{i}]", f"{addr} is listed twice")
                ok = False
            else:
                listen.append(addr)
        if items is not None and not items:
            v.error(m["listen"][1], f"{path}.listen", "must list at least one address")
        ok = ok and items is not None and bool(listen)
        kw["listen"] = tuple(listen)
    ports: list[int] = []
    if "ports" not in m:
        v.error(node, path, "missing required key 'ports'")
        ok = False
    else:
        items = v.sequence(m["ports"][1], f"{path}.ports")
        for i, item in enumerate(items or []):
            port = v.field(item, f"{path}.ports[{i}]", _port)
            if port is None:
                ok = False
            elif port in ports:
                v.error(item, f"{path}.ports[{i}]", f"port {port} is listed twice")
                ok = False
            else:
                ports.append(port)
        if items is not None and not items:
            v.error(m["ports"][1], f"{path}.ports", "must list at least one port")
            ok = False
    kw["ports"] = tuple(ports)
    if "scheduler" in m:
        kw["scheduler"] = v.field(m["scheduler"][1], f"{path}.scheduler", _scheduler)
        ok = ok and kw["scheduler"] is not None
    if "persistence" in m:
        kw["persistence"] = _persistence(v, m["persistence"][1], f"{path}.persistence")
    for key, check in (("connect_timeout", _positive_duration), ("idle_timeout", _duration)):
        if key in m:
            kw[key] = v.field(m[key][1], f"{path}.{key}", check)
            ok = ok and kw[key] is not None
    backends: list[BackendSpec] = []
    if "backends" not in m:
        v.error(node, path, "missing required key 'backends'")
        ok = False
    else:
        items = v.sequence(m["backends"][1], f"{path}.backends")
        names: set[str] = set()
        for i, item in enumerate(items or []):
            b = _backend(v, item, f"{path}.backends[{i}]", tuple(ports))
            if b is None:
                ok = False
            elif b.name in names:
                v.error(
                    item, f"{path}.backends[{i}].name", f"backend name {b.name!r} is used twice"
                )
                ok = False
            else:
                names.add(b.name)
                backends.append(b)
        if items is not None and not items:
            v.error(m["backends"][1], f"{path}.backends", "must list at least one backend")
            ok = False
    kw["backends"] = tuple(backends)
    if not ok:
        return None
    group = GroupSpec(name=name, **kw)
    if len(group.ports) > 1 and not group.persistence.enabled:
        v.warn(
            m["ports"][1],
            f"{path}.ports",
            "persistence is off, so one client's connections to these ports may reach"
            " different backends",
        )
    return group


def _listen_overlaps(a: GroupSpec, b: GroupSpec) -> Iterator[tuple[str, int]]:
    """(address, port) pairs that two groups would both bind."""
    for port in set(a.ports) & set(b.ports):
        for x in a.listen:
            for y in b.listen:
                xa, ya = ipaddress.ip_address(x), ipaddress.ip_address(y)
                if x == y or (
                    xa.version == ya.version and (xa.is_unspecified or ya.is_unspecified)
                ):
                    yield (x, port)


def _document(v: _Validator, root: yaml.Node) -> Config | None:
    m = v.mapping(root, "", _TOP_KEYS)
    if m is None:
        return None
    kw: dict[str, Any] = {}
    if "shutdown_timeout" in m:
        kw["shutdown_timeout"] = v.field(m["shutdown_timeout"][1], "shutdown_timeout", _duration)
    if "groups" not in m:
        v.error(root, "", "missing required key 'groups'")
        return None
    gnode = m["groups"][1]
    gm = v.mapping(gnode, "groups", ())
    if gm is None:
        return None
    if not gm:
        v.error(gnode, "groups", "must define at least one group")
    groups: list[GroupSpec] = []
    marks: dict[int, str] = {}
    for index, (gname, (knode, vnode)) in enumerate(gm.items()):
        if not _NAME_RE.match(gname):
            v.error(knode, f"groups.{gname}", "a group name is letters, digits, '_', '.', '-'")
            continue
        group = _group(v, gname, vnode, index)
        if group is None:
            continue
        if group.mark in marks:
            v.error(
                vnode,
                f"groups.{gname}.mark",
                f"mark {group.mark} is also used by group {marks[group.mark]!r}",
            )
            continue
        for other in groups:
            for addr, port in _listen_overlaps(group, other):
                v.error(
                    vnode,
                    f"groups.{gname}.ports",
                    f"{addr} port {port} is also bound by group {other.name!r}",
                )
        marks[group.mark] = gname
        groups.append(group)
    if v.errors:
        return None
    return Config(groups=tuple(groups), source=v.source, warnings=tuple(v.warnings), **kw)


def load_config_text(text: str, source: str = "<memory>") -> Config:
    v = _Validator(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise ConfigError(
            [f"{source}:{line}: invalid YAML: {exc.problem or exc.context}"]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}:1: invalid YAML: {exc}"]) from None
    if root is None:
        raise ConfigError([f"{source}:1: the file is empty; it needs a 'groups' mapping"])
    config = _document(v, root)
    if config is None:
        raise ConfigError(v.errors or [f"{source}:1: invalid configuration"])
    return config


def load_config(path: str | Path) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"{path}: cannot read the file: {reason}"]) from None
    return load_config_text(text, str(path))
