"""Configuration: YAML in, frozen dataclasses out; each error is one line: file, line, field path.

The loader composes the YAML into nodes (which carry line numbers) and validates the node tree
directly, so an error can always name the line it comes from. Unknown keys, duplicate keys and
wrong types are errors; all errors of a file are reported, not only the first.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

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


SORRY_SERVER = "sorry_server"


@dataclass(frozen=True, slots=True)
class HealthCheckSpec:
    type: str  # tcp | http | tls | exec | udp
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2  # consecutive passes that bring a down backend up
    fall: int = 3  # consecutive failures that take an up backend down
    port: int | None = None  # a service port of the group, mapped; default: the first
    path: str | None = None  # http (default "/"); tls: then GET this path
    status: tuple[int, ...] = (200,)
    body: str | None = None  # a substring the answer's body must contain
    host: str | None = None  # the Host header (default: the backend's address)
    send: str | None = None  # tcp: bytes to send once connected; udp: the datagram to send
    expect: str | None = None  # tcp, udp: a regex the first reply must match
    command: tuple[str, ...] = ()  # exec: argv
    verify: bool = False  # tls: verify the server certificate
    server_name: str | None = None  # tls: SNI (and the name verified)


@dataclass(frozen=True, slots=True)
class AcceptProxySpec:
    trusted: tuple[tuple[int, int, int], ...]  # (IP version, network as int, prefix length)
    timeout: float = 3.0


@dataclass(frozen=True, slots=True)
class BackendSpec:
    name: str
    address: str  # a normalised IP literal, or a DNS name (see l4lb/names.py)
    weight: int = 1
    ports: Mapping[int, int] = field(default_factory=dict)  # service port -> backend port
    max_conns: int = 0  # 0: unlimited (a UDP flow counts as a connection)
    inhibit_on_failure: bool = False
    health_check: HealthCheckSpec | None = None  # replaces the group's check for this backend
    state: str = "up"  # the operator's state at start: up | drain | disabled
    send_proxy: str | None = None  # v1 | v2 | none: overrides the group's
    slow_start: float | None = None  # overrides the group's
    resolve: str = "all"  # a name: all | first (of the addresses it resolves to)
    hostname: str = ""  # the name this backend was resolved from ("" for an IP literal)
    unresolved: str = ""  # why its name did not resolve (then `address` is the name, down)
    udp_ports: Mapping[int, int] = field(default_factory=dict)  # UDP service port -> backend's

    @property
    def is_name(self) -> bool:
        """An address still to resolve (the configuration as written, before l4lb/names.py)."""
        return not self.hostname and not _is_ip(self.address)

    def port_for(self, service_port: int) -> int:
        return self.ports.get(service_port, service_port)

    def udp_port_for(self, service_port: int) -> int:
        return self.udp_ports.get(service_port, service_port)


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
class AccessLogSpec:
    """The connection log: a line per connection when it ends (and when it is established)."""

    path: str = "stdout"  # stdout | stderr | a file
    format: str = "json"  # json | text
    log_on_connect: bool = False


@dataclass(frozen=True, slots=True)
class ClientLimitsSpec:
    """Per client network (the group's persistence netmask): open connections and a rate."""

    max_conns: int = 0  # open connections at once; 0: no limit
    rate: float = 0.0  # new connections per second, refilling a bucket of `burst`; 0: no limit
    burst: float = 1.0  # new connections at once before the rate applies


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
    health_check: HealthCheckSpec | None = None
    passive_failures: int = 3  # consecutive connect failures that mark a backend down; 0: off
    sorry_server: BackendSpec | None = None
    quorum: int = 1  # fewer backends up than this (with hysteresis): the sorry server serves
    hysteresis: int = 0
    on_down: str = "keep"  # keep | close the open connections of a backend that goes down
    on_up: str = "stay"  # stay | return: re-pinned clients move back when a backend returns
    queue_timeout: float = 0.0  # how long a pinned client waits for a full backend
    notify: tuple[str, ...] = ()  # argv run on every state change
    relay: str = "copy"  # copy | auto (splice once a flow streams) | splice (Linux zero-copy)
    send_proxy: str | None = None  # v1 | v2: a PROXY header to the backends
    kernel_mark: int | None = None  # chosen by this firewall mark on the kernel_marks listener
    accept_proxy: AcceptProxySpec | None = None  # a PROXY header required from trusted peers
    client_limits: ClientLimitsSpec | None = None
    slow_start: float = 0.0  # seconds over which a backend that comes up ramps to its weight
    access_log: AccessLogSpec | None = None  # the group's own, else the top level's; None: off
    udp_ports: tuple[int, ...] = ()  # "443/udp" in `ports`: datagram services (l4lb/udp.py)
    udp_idle_timeout: float = 60.0  # a flow ends after this long without a datagram either way
    udp_max_flows: int = 100_000  # flows at once; beyond, the oldest idle one goes

    @property
    def first_port(self) -> int:
        """The service port a check or an inline backend port refers to by default."""
        return self.ports[0] if self.ports else self.udp_ports[0]


@dataclass(frozen=True, slots=True)
class AdminSpec:
    host: str = "127.0.0.1"
    port: int = 9090
    token_file: str | None = None  # a bearer token for mutating calls; without one they are refused
    request_timeout: float = 10.0  # for a request's head, and again for its body
    max_connections: int = 64  # open at once; more are answered 503

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if self.host == "0.0.0.0" else "[::1]"
        return f"http://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class KernelMarksSpec:
    """One listener fed by iptables/nft REDIRECT; each connection's mark picks its group."""

    host: str = "0.0.0.0"
    port: int = 9999


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """A shared affinity table in Redis (or Valkey): pins that every instance finds."""

    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "l4lb:"
    budget: float = 0.01  # seconds a lookup may take before the consistent hash decides
    retry_interval: float = 1.0  # how often a store that failed is probed
    cluster: bool = False  # a Redis Cluster (url names one of its nodes)


MAX_WORKERS = 64


@dataclass(frozen=True, slots=True)
class Config:
    groups: tuple[GroupSpec, ...]
    workers: int = 1
    affinity_store: StoreSpec | None = None  # None: each process keeps its own table
    shutdown_timeout: float = 10.0
    admin: AdminSpec | None = None
    kernel_marks: KernelMarksSpec | None = None
    state_file: str | None = None
    state_interval: float = 30.0
    access_log: AccessLogSpec | None = None  # the default of every group
    resolve_interval: float = 10.0  # how often backends given by DNS name are looked up again
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


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\x85]")


def _one_line(text: str) -> str:
    """A key or value may hold a newline or another control character: escaped, so that an
    error stays one line."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class _Invalid(Exception):
    """Raised inside a field check; turned into one error line by `_Validator.field`."""


class _Validator:
    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.nodes: dict[str, yaml.Node] = {}  # backends' nodes by path, for later checks

    def error(self, node: yaml.Node | None, path: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        where = f"{path}: " if path else ""
        self.errors.append(_one_line(f"{self.source}:{line}: {where}{message}"))

    def warn(self, node: yaml.Node | None, path: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.warnings.append(_one_line(f"{self.source}:{line}: {path}: warning: {message}"))

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
            value = _scalar(node)
        except Exception:  # a malformed !!binary or !!timestamp, say
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            self.error(node, path, f"cannot read {node.value!r} as {tag}")
            return None
        try:
            return check(value)
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


_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _backend_address(v: Any) -> tuple[str, int | None]:
    """`10.0.0.5`, `[::1]`, `::1`, `app` (a DNS name), each with an optional `:port`
    (`10.0.0.5:8080`, `[::1]:8080`, `app:8080`): (the IP literal or the name, the port)."""
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected an IP address or a DNS name, got {v!r}")
    host, port = v, None
    if v.startswith("["):
        close = v.find("]")
        rest = v[close + 1 :] if close > 0 else "?"
        if close < 0 or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [IPv6] or [IPv6]:port, got {v!r}")
        host, port_text = v[1:close], rest[1:] if rest else None
        if not _is_ip(host) or ":" not in host:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address")
        port = _port_text(port_text, v) if port_text is not None else None
    elif v.count(":") == 1:  # an IPv4 address or a name, with a port
        host, port_text = v.split(":")
        port = _port_text(port_text, v)
    if _is_ip(host):
        return str(ipaddress.ip_address(host)), port
    if ":" in host or not _HOSTNAME_RE.match(host) or host.replace(".", "").isdigit():
        raise ValueError(f"expected an IP address or a DNS name (optionally with :port), got {v!r}")
    return host.lower().rstrip("."), port


def _port_text(text: str, whole: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"the port in {whole!r} must be a number from 1 to 65535")
    return int(text)


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

_TOP_KEYS = (
    "groups",
    "workers",
    "affinity_store",
    "shutdown_timeout",
    "admin",
    "state_file",
    "state_interval",
    "kernel_marks",
    "access_log",
    "resolve_interval",
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
)
_PERSIST_KEYS = ("timeout", "netmask", "ipv6_prefix", "max_entries")
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
)
_CHECK_COMMON = ("type", "interval", "timeout", "rise", "fall", "port")
_CHECK_KEYS = {
    "tcp": ("send", "expect"),
    "http": ("path", "status", "body", "host"),
    "tls": ("verify", "server_name", "path", "status", "body", "host"),
    "exec": ("command",),
    "udp": ("send", "expect"),
}


def _scalars(
    v: _Validator,
    m: dict[str, tuple[yaml.Node, yaml.Node]],
    path: str,
    checks: dict[str, Callable[[Any], Any]],
    kw: dict[str, Any],
) -> bool:
    """Check each present key of `checks` into `kw`; False if any was invalid."""
    ok = True
    for key, check in checks.items():
        if key in m:
            value = v.field(m[key][1], f"{path}.{key}" if path else key, check)
            if value is None:
                ok = False
            else:
                kw[key] = value
    return ok


def _choice(*allowed: str) -> Callable[[Any], str]:
    def check(x: Any) -> str:
        if x not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {x!r}")
        return str(x)

    return check


def _bool(x: Any) -> bool:
    if not isinstance(x, bool):
        raise ValueError(f"expected true or false, got {x!r}")
    return x


def _text(x: Any) -> str:
    if not isinstance(x, str) or not x:
        raise ValueError(f"expected a non-empty string, got {x!r}")
    return x


def _url_path(x: Any) -> str:
    if not isinstance(x, str) or not x.startswith("/") or any(c in x for c in " \r\n"):
        raise ValueError(f"expected a path starting with '/' and without spaces, got {x!r}")
    return x


def _regex(x: Any) -> str:
    text = _text(x)
    try:
        re.compile(text.encode())
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return text


def _status_range(x: Any) -> range:
    """An HTTP status (200) or a range of them ("200-299")."""
    if isinstance(x, str) and _RANGE_RE.match(x):
        first, last = (int(p) for p in x.split("-"))
        if 100 <= first <= last <= 599:
            return range(first, last + 1)
        raise ValueError(f"expected statuses from 100 to 599, low to high, got {x!r}")
    code = _int_in(100, 599, "an HTTP status")(x)
    return range(code, code + 1)


def _list_of(
    v: _Validator, node: yaml.Node, path: str, check: Callable[[Any], T]
) -> list[T] | None:
    """A list (or a single value, taken as a list of one) checked item by item."""
    if isinstance(node, yaml.ScalarNode):
        one = v.field(node, path, check)
        return None if one is None else [one]
    items = v.sequence(node, path)
    if items is None:
        return None
    out = []
    for i, item in enumerate(items):
        value = v.field(item, f"{path}[{i}]", check)
        if value is None:
            return None
        out.append(value)
    if not out:
        v.error(node, path, "must not be empty")
        return None
    return out


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


_RANGE_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


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
        "state": _choice("up", "drain", "disabled"),
        "send_proxy": _choice("v1", "v2", "none"),
        "slow_start": _duration,
        "resolve": _choice("all", "first"),
    }
    ok = _scalars(v, m, path, checks, kw) and ok
    inline_port: int | None = None
    if isinstance(kw.get("address"), tuple):
        kw["address"], inline_port = kw["address"]
    if "resolve" in kw and "address" in kw and _is_ip(kw["address"]):
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


def _cidr(x: Any) -> tuple[int, int, int]:
    if not isinstance(x, str):
        raise ValueError(f"expected a network such as 10.0.0.0/8, got {x!r}")
    try:
        net = ipaddress.ip_network(x, strict=False)
    except ValueError:
        raise ValueError(f"expected a network such as 10.0.0.0/8, got {x!r}") from None
    return net.version, int(net.network_address), net.prefixlen


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


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")


def _rate(x: Any) -> float:
    """'50/s', '600/m', '1000/h', or a number (per second) -> connections per second."""
    if isinstance(x, int | float) and not isinstance(x, bool) and x > 0:
        return float(x)
    if isinstance(x, str):
        m = _RATE_RE.match(x)
        if m and float(m.group(1)) > 0:
            return float(m.group(1)) / {"s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]
    raise ValueError(f'expected a rate such as "50/s" or "600/m", got {x!r}')


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


def _passive(v: _Validator, node: yaml.Node, path: str) -> int | None:
    m = v.mapping(node, path, ("failures",))
    if m is None:
        return None
    if "failures" not in m:
        return 3
    return v.field(m["failures"][1], f"{path}.failures", _int_in(0, 1000))


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
        if twice:
            suffix = "/udp" if proto == "udp" else ""
            v.error(item, f"{path}[{i}]", f"port {compact_ports(twice)}{suffix} is listed twice")
            ok = False
            continue
        seen[proto].update(rng)
        ports[proto].extend(rng)
    if not items:
        v.error(node, path, "must list at least one port")
        ok = False
    return GroupPorts(tuple(ports["tcp"]), tuple(ports["udp"])) if ok else None


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
    checks: dict[str, Callable[[Any], Any]] = {
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
    }
    ok = _scalars(v, m, path, checks, kw) and ok
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
    }
    for key, (field_name, parse) in sections.items():
        if key in m:
            value = parse(m[key][1], f"{path}.{key}")
            ok = ok and value is not None
            kw[field_name] = value
    if not ok:
        return None
    group = GroupSpec(name=name, **kw)
    if group.udp_ports and group.kernel_mark is not None:
        v.error(
            m["ports"][1],
            f"{path}.ports",
            "a kernel_mark group is TCP only (its traffic comes through the kernel_marks"
            " listener): move the UDP ports to a group of their own",
        )
        return None
    if len(group.ports) + len(group.udp_ports) > 1 and not group.persistence.enabled:
        v.warn(
            m["ports"][1],
            f"{path}.ports",
            "persistence is off, so one client's connections to these ports may reach"
            " different backends",
        )
    if "quorum" in m and group.sorry_server is None:
        v.warn(m["quorum"][1], f"{path}.quorum", "has no effect without a sorry_server")
    return group


def _beside(source: str, path: str) -> str:
    """A relative path in a file means relative to that file's folder."""
    if source.startswith("<") or Path(path).is_absolute():
        return path
    return str(Path(source).parent / path)


def _host_port(x: Any) -> tuple[str, int]:
    if not isinstance(x, str) or ":" not in x:
        raise ValueError(f"expected host:port such as 127.0.0.1:9090, got {x!r}")
    host, _, port = x.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    return _ip(host), _port(int(port) if port.isdigit() else port)


def _admin(v: _Validator, node: yaml.Node, path: str) -> AdminSpec | None:
    m = v.mapping(node, path, ("listen", "token_file", "request_timeout", "max_connections"))
    if m is None:
        return None
    kw: dict[str, Any] = {}
    limits = {"request_timeout": _positive_duration, "max_connections": _int_in(1, 100_000)}
    if not _scalars(v, m, path, limits, kw):
        return None
    if "listen" in m:
        hp = v.field(m["listen"][1], f"{path}.listen", _host_port)
        if hp is None:
            return None
        kw["host"], kw["port"] = hp
    if "token_file" in m:
        tf = v.field(m["token_file"][1], f"{path}.token_file", _text)
        if tf is None:
            return None
        tf = _beside(v.source, tf)
        try:
            if not Path(tf).read_text(encoding="utf-8").strip():
                v.error(m["token_file"][1], f"{path}.token_file", f"{tf} is empty")
                return None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            v.error(m["token_file"][1], f"{path}.token_file", f"cannot read {tf}: {reason}")
            return None
        kw["token_file"] = tf
    return AdminSpec(**kw)


def _redis_url(x: Any) -> str:
    if not isinstance(x, str) or not x.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {x!r}")
    return x


def _budget(x: Any) -> float:
    seconds = _positive_duration(x)
    if seconds > 1.0:
        raise ValueError("a lookup budget is at most 1s: Redis must never hold a connection long")
    return seconds


def _store(v: _Validator, node: yaml.Node, path: str) -> StoreSpec | None:
    m = v.mapping(node, path, ("type", "url", "key_prefix", "budget", "retry_interval", "cluster"))
    if m is None:
        return None
    kind = "redis"
    if "type" in m:
        kind = v.field(m["type"][1], f"{path}.type", _choice("local", "redis")) or ""
    kw: dict[str, Any] = {}
    checks: dict[str, Callable[[Any], Any]] = {
        "url": _redis_url,
        "key_prefix": _text,
        "budget": _budget,
        "retry_interval": _positive_duration,
        "cluster": _bool,
    }
    if not _scalars(v, m, path, checks, kw) or kind != "redis":
        return None
    return StoreSpec(**kw)


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


def is_local_address(address: str) -> bool:
    """Whether `address` is one of this host's (loopback, or bindable here)."""
    ip = ipaddress.ip_address(address)
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


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


def _document(v: _Validator, root: yaml.Node) -> Config | None:
    m = v.mapping(root, "", _TOP_KEYS)
    if m is None:
        return None
    kw: dict[str, Any] = {}
    checks: dict[str, Callable[[Any], Any]] = {
        "shutdown_timeout": _duration,
        "state_file": _text,
        "state_interval": _positive_duration,
        "workers": _int_in(1, MAX_WORKERS, "a number of worker processes"),
        "resolve_interval": _positive_duration,
    }
    _scalars(v, m, "", checks, kw)
    if "affinity_store" in m:
        kw["affinity_store"] = _store(v, m["affinity_store"][1], "affinity_store")
    if "state_file" in kw:
        kw["state_file"] = _beside(v.source, kw["state_file"])
    if "admin" in m:
        kw["admin"] = _admin(v, m["admin"][1], "admin")
    if "access_log" in m:
        top_log = _access_log(v, m["access_log"][1], "access_log")
        kw["access_log"] = None if top_log is _LOG_OFF else top_log
    if "kernel_marks" in m:
        km = v.mapping(m["kernel_marks"][1], "kernel_marks", ("listen",))
        if km is not None and "listen" in km:
            hp = v.field(km["listen"][1], "kernel_marks.listen", _host_port)
            if hp is not None:
                kw["kernel_marks"] = KernelMarksSpec(*hp)
        elif km is not None:
            v.error(m["kernel_marks"][1], "kernel_marks", "missing required key 'listen'")
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
        if group.kernel_mark is not None:
            if "kernel_marks" not in m:
                v.error(
                    vnode,
                    f"groups.{gname}.kernel_mark",
                    "needs the top-level kernel_marks listener",
                )
            clash = next((g.name for g in groups if g.kernel_mark == group.kernel_mark), None)
            if clash is not None:
                v.error(
                    vnode,
                    f"groups.{gname}.kernel_mark",
                    f"mark {group.kernel_mark} is also group {clash!r}'s",
                )
        for other in groups:
            for addr, common in _listen_overlaps(group, other):
                v.error(
                    vnode,
                    f"groups.{gname}.ports",
                    f"{addr} port {common} is also bound by group {other.name!r}",
                )
        marks[group.mark] = gname
        groups.append(group)
    default_log = kw.get("access_log")
    for i, g in enumerate(groups):  # a group's own log, `off`, or the top level's
        own = g.access_log
        if own is None or own is _LOG_OFF:
            groups[i] = replace(g, access_log=None if own is _LOG_OFF else default_log)
    if not v.errors:
        _check_loops(v, groups, kw.get("kernel_marks"))
    if v.errors:
        return None
    return Config(groups=tuple(groups), source=v.source, warnings=tuple(v.warnings), **kw)


# The tags SafeLoader resolves by itself: anything else (`!custom`, `!!python/object:...`) is
# refused by name rather than left to the constructor, which raises on it.
_KNOWN_TAGS = frozenset(t for t in yaml.SafeLoader.yaml_constructors if t is not None)


def _first_unknown_tag(root: yaml.Node) -> yaml.Node | None:
    """The first node (in document order) whose tag YAML's safe schema does not know. Walked
    with a stack and a set of seen nodes: aliases make the tree a graph, and a deep one must
    not exhaust the recursion limit."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.tag not in _KNOWN_TAGS:
            return node
        if isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in reversed(node.value) for n in reversed(pair))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
    return None


def _compose(text: str, source: str) -> yaml.Node | None:
    """The node tree of `text`; every YAML problem is one line naming its own line."""

    def refuse(line: int, what: str) -> ConfigError:
        return ConfigError([_one_line(f"{source}:{line}: invalid YAML: {' '.join(what.split())}")])

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise refuse(
            mark.line + 1 if mark is not None else 1,
            str(exc.problem or exc.context or "not valid YAML"),
        ) from None
    except yaml.reader.ReaderError as exc:  # a control character, say: it knows its offset
        char = exc.character
        what = f"#x{char:04x}" if isinstance(char, int) else repr(char)
        line = text.count("\n", 0, max(0, exc.position)) + 1
        raise refuse(line, f"character {what} is not allowed ({exc.reason})") from None
    except yaml.YAMLError as exc:
        raise refuse(1, str(exc)) from None
    except RecursionError:
        raise refuse(1, "nested too deeply") from None
    if root is not None:
        bad = _first_unknown_tag(root)
        if bad is not None:
            raise refuse(
                bad.start_mark.line + 1,
                f"unknown tag {bad.tag!r} (l4lb reads plain YAML: strings, numbers, booleans,"
                " lists, mappings)",
            )
    return root


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in sorted(value.items())) + "}"
    return str(value)


def changes(old: object, new: object, prefix: str = "", skip: tuple[str, ...] = ()) -> list[str]:
    """What differs between two configuration dataclasses, field by field ("scheduler wlc ->
    rr", "persistence.timeout 300 -> 600"), nested ones by their own fields."""
    out: list[str] = []
    for f in fields(old):  # type: ignore[arg-type]
        if f.name in skip:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        if is_dataclass(a) and is_dataclass(b) and type(a) is type(b):
            out += changes(a, b, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name} {_shown(a)} -> {_shown(b)}")
    return out


def load_config_text(text: str, source: str = "<memory>") -> Config:
    v = _Validator(source)
    root = _compose(text, source)
    if root is None:
        raise ConfigError([f"{source}:1: the file is empty; it needs a 'groups' mapping"])
    config = _document(v, root)
    if config is None:
        raise ConfigError(v.errors or [f"{source}:1: invalid configuration"])
    return config


def load_admin_section(path: str | Path) -> AdminSpec | None:
    """Only the `admin` section of a file, validated as `load_config` would."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read the file: {exc}"]) from None
    root = _compose(text, str(path))
    v = _Validator(str(path))
    m = v.mapping(root, "", ()) if root is not None else None
    admin = _admin(v, m["admin"][1], "admin") if m and "admin" in m else None
    if v.errors:
        raise ConfigError(v.errors)
    return admin


def load_config(path: str | Path) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"{path}: cannot read the file: {reason}"]) from None
    return load_config_text(text, str(path))
