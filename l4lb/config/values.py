"""Scalar values of the configuration: durations, netmasks, addresses, names, choices, rates.
Each takes what YAML gave and returns the typed value or raises `_Invalid` with the reason."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.spec import SCHEDULERS, is_ip

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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
        if not is_ip(host) or ":" not in host:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address")
        port = _port_text(port_text, v) if port_text is not None else None
    elif v.count(":") == 1:  # an IPv4 address or a name, with a port
        host, port_text = v.split(":")
        port = _port_text(port_text, v)
    if is_ip(host):
        return str(ipaddress.ip_address(host)), port
    if ":" in host or not _HOSTNAME_RE.match(host) or host.replace(".", "").isdigit():
        raise ValueError(f"expected an IP address or a DNS name (optionally with :port), got {v!r}")
    return host.lower().rstrip("."), port


def _host_name(v: Any) -> str:
    """A DNS name the admin API answers to (`admin.hosts`), lower case, no trailing dot."""
    if not isinstance(v, str) or is_ip(v) or not _HOSTNAME_RE.match(v):
        raise ValueError(f"expected a DNS name, got {v!r}")
    return v.lower().rstrip(".")


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


_RANGE_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def _cidr(x: Any) -> tuple[int, int, int]:
    if not isinstance(x, str):
        raise ValueError(f"expected a network such as 10.0.0.0/8, got {x!r}")
    try:
        net = ipaddress.ip_network(x, strict=False)
    except ValueError:
        raise ValueError(f"expected a network such as 10.0.0.0/8, got {x!r}") from None
    return net.version, int(net.network_address), net.prefixlen


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


def _hex_id(x: Any) -> str:
    """A QUIC-LB server ID: hex digits ("0a1b"; read as written when unquoted), lower-cased."""
    if not isinstance(x, str):
        raise ValueError(f'expected hex digits in quotes, such as "0a1b", got {x!r}')
    text = x.lower().removeprefix("0x")
    if not text or len(text) % 2 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"expected whole octets of hex digits, such as 0a1b, got {x!r}")
    return text


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


def _redis_url(x: Any) -> str:
    if not isinstance(x, str) or not x.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {x!r}")
    return x


def _budget(x: Any) -> float:
    seconds = _positive_duration(x)
    if seconds > 1.0:
        raise ValueError("a lookup budget is at most 1s: Redis must never hold a connection long")
    return seconds


MIN_TOKEN = 16  # bytes: shorter is no secret
EXAMPLE_TOKENS = frozenset({"replace-me-with-a-long-random-token"})  # shipped by earlier versions


def token_problem(token: str) -> str | None:
    """Why `token` (a token file's content, stripped) cannot be the admin API's secret."""
    if token in EXAMPLE_TOKENS:
        return "holds the example's placeholder, which anyone who read the repository knows"
    if len(token.encode()) < MIN_TOKEN:
        return f"holds {len(token.encode())} bytes: a token is at least {MIN_TOKEN}"
    return None


def _source(x: Any) -> str:
    """A group's `source`: `client`, or an address of this host to dial from."""
    if x == "client":
        return "client"
    if isinstance(x, str):
        try:
            return str(ipaddress.ip_address(x))
        except ValueError:
            pass
    raise ValueError(f"expected client or an IP address to dial from, got {x!r}")
