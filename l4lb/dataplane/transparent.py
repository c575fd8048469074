"""Dialing a backend from a chosen address: the client's own (`source: client`, transparent
proxying) or a fixed one of this host (`source: ADDRESS`).

Theory of operation
-------------------
A full proxy's backend sees the proxy's address. To let it see the client's, the dial's socket
takes `IP_TRANSPARENT` (`IPV6_TRANSPARENT`), which lets it bind an address this host does not
own, binds the client's address (TCP: port 0, the kernel's pick, so that a client's many
connections never collide; UDP: the client's own port too, so that the backend sees exactly
the client's address and port), then connects as usual. HAProxy's `usesrc clientip`, nginx's
`proxy_bind $remote_addr transparent` and Envoy's `original_src` do the same. Two things lie
outside l4lb and must be right for it to work:

- the capability: `IP_TRANSPARENT` needs `CAP_NET_ADMIN` (`has_net_admin` reads it);
- the way back: the backend answers the client's address, so its route to clients must pass
  through this host (LVS-NAT asks the same of real servers), and this host must deliver those
  answers locally instead of forwarding them: a policy rule sends what arrives from the
  backends' side to a table whose only route is `local 0.0.0.0/0 dev lo`
  (`ip rule add iif BACKEND-SIDE lookup 100; ip route add local 0.0.0.0/0 dev lo table 100`).
  `routing_problems` reads the rules and that table from the kernel (through iproute2's JSON)
  and says what is missing. Without them a dial's answer never reaches its socket and the dial
  times out: that is the host's fault, not the backend's, and is counted so.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)  # linux/in.h
IPV6_TRANSPARENT = 75  # linux/in6.h
CAP_NET_ADMIN = 12


class SourceError(OSError):
    """The dial could not take its source address: this host's fault (a missing capability,
    an address of the wrong family), never the backend's."""


def source_socket(
    kind: int, backend: str, source: str, port: int, transparent: bool
) -> socket.socket:
    """A non-blocking socket of `kind` bound to (`source`, `port`), ready to connect to the
    IP literal `backend`."""
    source = source.removeprefix("::ffff:")
    v6 = ":" in backend
    if (":" in source) != v6:
        raise SourceError(f"a client of one address family ({source}) and a backend of another")
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind)
    try:
        sock.setblocking(False)
        if transparent:
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        try:
            sock.bind((source, port))
        except OSError:
            if not port:
                raise
            sock.bind((source, 0))  # the client's port is taken here: any port of its address
    except PermissionError:
        sock.close()
        raise SourceError("IP_TRANSPARENT needs CAP_NET_ADMIN") from None
    except OSError as exc:
        sock.close()
        raise SourceError(f"cannot bind {source}: {exc.strerror or exc}") from None
    return sock


async def connect(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.BaseProtocol],
    host: str,
    port: int,
    source: str,
    transparent: bool,
) -> asyncio.BaseProtocol:
    """`loop.create_connection(factory, host, port)` from `source`."""
    sock = source_socket(socket.SOCK_STREAM, host, source, 0, transparent)
    try:
        await loop.sock_connect(sock, (host, port))
        _, protocol = await loop.create_connection(factory, sock=sock)
    except BaseException:
        sock.close()
        raise
    return protocol


def has_net_admin() -> bool:
    """Whether this process holds CAP_NET_ADMIN (its effective set, /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _ip_json(*argv: str) -> list[dict[str, object]] | None:
    ip = shutil.which("ip")
    if ip is None:
        return None
    try:
        out = subprocess.run([ip, "-j", *argv], capture_output=True, text=True, timeout=5)
        got = json.loads(out.stdout or "[]") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return got if isinstance(got, list) else None


def routing_problems(v6: bool = False) -> list[str] | None:
    """What the host lacks for answers to transparent dials to come back to l4lb: [] when a
    policy rule leads to a table holding a local default route on lo; None when it cannot
    tell (no iproute2)."""
    family = ("-6",) if v6 else ()
    rules = _ip_json(*family, "rule", "show")
    if rules is None:
        return None
    tables = {
        str(r.get("table"))
        for r in rules
        if r.get("table") not in (None, "local", "main", "default")
        and ("iif" in r or "fwmark" in r)
    }
    for table in sorted(tables):
        routes = _ip_json(*family, "route", "show", "table", table) or []
        for route in routes:
            if (
                route.get("type") == "local"
                and route.get("dst") in ("default", "0.0.0.0/0", "::/0")
                and route.get("dev") == "lo"
            ):
                return []
    any_net = "::/0" if v6 else "0.0.0.0/0"
    if not tables:
        return [
            "no policy rule sends the backends' answers to a local table"
            f" (ip {'-6 ' if v6 else ''}rule add iif BACKEND-SIDE lookup 100)"
        ]
    return [
        f"no local default route in table {', '.join(sorted(tables))}"
        f" (ip {'-6 ' if v6 else ''}route add local {any_net} dev lo table 100)"
    ]
