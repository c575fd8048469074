"""Demo backends for `make run`: tiny HTTP and HTTPS servers that answer with their name, so a
user sees stickiness at once. Started only with `l4lb run --demo`, only for loopback backends.

HTTPS is served on backend ports mapped from service ports 443 and 8443, with a self-signed
certificate shipped for the demo (never use it for anything else). A UDP port gets an echo
that answers each datagram with the backend's name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from pathlib import Path
from typing import cast

from .core.spec import Config
from .runtime.errors import StartupError

log = logging.getLogger("l4lb.demo")
TLS_SERVICE_PORTS = (443, 8443)
_TLS_DIR = Path(__file__).with_name("demo_tls")


class _DemoHTTP(asyncio.Protocol):
    """Reads one request head, answers with the backend's name, closes."""

    def __init__(self, name: str, scheme: str) -> None:
        self.name = name
        self.scheme = scheme
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" not in self.buf and len(self.buf) < 65536:
            return
        # (the backend's name only: its peer is l4lb's address, never the client's, which a
        # reader of the README took it for)
        body = f"{self.name} ({self.scheme})\n".encode()
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            f"X-Backend: {self.name}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()


class _DemoUDP(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        text = data[:200].decode(errors="replace").strip()
        self.transport.sendto(f"{self.name} (udp): {text}\n".encode(), addr)


def _tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(_TLS_DIR / "cert.pem", _TLS_DIR / "key.pem")
    return ctx


async def start_demo_backends(config: Config) -> list[asyncio.AbstractServer]:
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []
    for g in config.groups:
        for b in g.backends:
            if b.is_name or not ipaddress.ip_address(b.address).is_loopback:
                continue
            for port in g.udp_ports:

                def echo(name: str = b.name) -> _DemoUDP:
                    return _DemoUDP(name)

                where = (b.address, b.udp_port_for(port))
                try:
                    await loop.create_datagram_endpoint(echo, local_addr=where, reuse_port=True)
                except OSError as exc:
                    raise StartupError(
                        f"cannot start the demo backend {b.name} on {where[0]}:{where[1]}/udp:"
                        f" {exc.strerror or exc}"
                    ) from None
                log.info("demo backend %s serving udp on %s:%d", b.name, *where)
    tls: ssl.SSLContext | None = None
    for g in config.groups:
        for b in g.backends:
            if b.is_name or not ipaddress.ip_address(b.address).is_loopback:
                continue  # (a name is somebody else's to serve)
            for port in g.ports:
                scheme = "https" if port in TLS_SERVICE_PORTS else "http"
                if scheme == "https" and tls is None:
                    tls = _tls_context()

                def factory(name: str = b.name, scheme: str = scheme) -> _DemoHTTP:
                    return _DemoHTTP(name, scheme)

                try:
                    srv = await loop.create_server(
                        factory,
                        b.address,
                        b.port_for(port),
                        ssl=tls if scheme == "https" else None,
                        reuse_address=True,
                        # (an upgrade's new process starts its own beside the old one's,
                        # which go with the old process)
                        reuse_port=True,
                    )
                except OSError as exc:
                    for started in servers:
                        started.close()
                    raise StartupError(
                        f"cannot start the demo backend {b.name} on {b.address}:"
                        f"{b.port_for(port)}: {exc.strerror or exc}"
                    ) from None
                servers.append(srv)
                log.info(
                    "demo backend %s serving %s on %s:%d",
                    b.name,
                    scheme,
                    b.address,
                    b.port_for(port),
                )
    return servers


def print_hints(config: Config) -> None:
    g = config.groups[0]
    host = g.listen[0] if g.listen[0] not in ("0.0.0.0", "::") else "127.0.0.1"
    ports = ", ".join([*map(str, g.ports), *(f"{p}/udp" for p in g.udp_ports)])
    lines = [f"l4lb demo: group {g.name!r} on {host} ports {ports}. Try:"]
    for port in g.ports:
        scheme = "https" if port in TLS_SERVICE_PORTS else "http"
        insecure = "-k " if scheme == "https" else ""
        lines.append(f"  curl {insecure}{scheme}://{host}:{port}/")
    for port in g.udp_ports:
        lines.append(
            '  python3 -c "import socket; s = socket.socket(2, 2); s.settimeout(2);'
            f" s.sendto(b'hi', ('{host}', {port})); print(s.recv(999).decode())\""
        )
    lines.append("Each answers from the same backend (one client, one pin, every port).")
    lines.append("Be another client (another /24) with: curl --interface 127.0.7.1 http://...")
    print("\n".join(lines), flush=True)
