"""Shared test helpers: free ports, real backends on loopback, a balancer in the test's loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import socket
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from l4lb import Server
from l4lb.config import Config, load_config_text
from tests.support.lab_backend import greet_and_echo

_rng = random.Random()
PORTS = range(20000, 32768)  # below Linux's ephemeral range: no client socket takes one


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that were free a moment ago for TCP and UDP on every address (a test
    may listen on a wildcard, or on UDP too): drawn below the ephemeral range, so that the
    many clients the tests bind to 127/8 addresses never hold one of them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    out: list[int] = []
    for _ in range(100 * n + 1000):  # bounded: a machine with nothing free fails, not hangs
        if len(out) == n:
            return out
        port = _rng.choice(PORTS)
        if port in out:
            continue
        socks = [socket.socket(family, kind) for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM)]
        try:
            for s in socks:
                try:
                    s.bind((wildcard, port))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise
                    s.bind((host, port))  # no wildcard of this family here
            out.append(port)
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} free ports in {PORTS.start}-{PORTS.stop - 1}")


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class NamedBackend:
    """A real TCP server that greets each connection with its name, then echoes.

    It listens on one port per service port (`ports`), like a backend with a port map."""

    name: str
    host: str = "127.0.0.1"
    ports: dict[int, int] = field(default_factory=dict)  # service port -> bound port
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    connections: int = 0

    async def start(self, service_ports: list[int], same_port: bool = False) -> NamedBackend:
        for sp in service_ports:
            srv = await asyncio.start_server(self._handle, self.host, sp if same_port else 0)
            self.servers.append(srv)
            self.ports[sp] = srv.sockets[0].getsockname()[1]
        return self

    async def restart(self) -> None:
        """Listen again on the same ports, after `stop`."""
        for bound in self.ports.values():
            self.servers.append(await asyncio.start_server(self._handle, self.host, bound))

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        await greet_and_echo(f"{self.name}\n".encode(), r, w)

    async def stop(self) -> None:
        for srv in self.servers:
            srv.close()
            with contextlib.suppress(Exception):
                srv.close_clients()  # type: ignore[attr-defined]
        for srv in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2)
        self.servers.clear()

    def yaml(self, weight: int = 1, only: list[int] | None = None) -> str:
        pm = ", ".join(f"{k}: {v}" for k, v in self.ports.items() if only is None or k in only)
        return f"- {{name: {self.name}, address: '{self.host}', weight: {weight}, ports: {{{pm}}}}}"


def group_yaml(
    name: str,
    ports: list[int],
    backends: list[str],
    *,
    listen: str = '["127.0.0.1"]',
    scheduler: str = "rr",
    timeout: str = "60s",
    netmask: str = "/32",
    extra: str = "",
    persistence_extra: str = "",
) -> str:
    lines = [
        f"  {name}:",
        f"    listen: {listen}",
        f"    ports: [{', '.join(map(str, ports))}]",
        f"    scheduler: {scheduler}",
        f"    persistence: {{timeout: {timeout}, netmask: '{netmask}'{persistence_extra}}}",
        "    connect_timeout: 1s",
    ]
    lines += [f"    {x}" for x in extra.splitlines() if x.strip()]
    lines.append("    backends:")
    lines += [f"      {b}" for b in backends]
    return "\n".join(lines)


class UdpBackend(asyncio.DatagramProtocol):
    """A real UDP server that answers each datagram with its name, a space and the datagram."""

    def __init__(self, name: str, host: str = "127.0.0.1") -> None:
        self.name = name
        self.host = host
        self.port = 0
        self.datagrams = 0
        self.transport: asyncio.DatagramTransport | None = None

    async def start(self, port: int = 0) -> UdpBackend:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=(self.host, port))
        assert self.transport is not None
        self.port = self.transport.get_extra_info("sockname")[1]
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.datagrams += 1
        assert self.transport is not None
        self.transport.sendto(self.name.encode() + b" " + data, addr)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class UdpClient(asyncio.DatagramProtocol):
    """One client address and port: a connected UDP socket from `src` (so, like QUIC's, it takes
    answers only from the address it sent to)."""

    def __init__(self) -> None:
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()
        self.errors: list[Exception] = []
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, port: int, src: str = "127.0.0.1", host: str = "127.0.0.1") -> UdpClient:
        loop = asyncio.get_running_loop()
        client = cls()
        await loop.create_datagram_endpoint(
            lambda: client, local_addr=(src, 0), remote_addr=(host, port)
        )
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.answers.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)

    async def ask(self, data: bytes = b"hi", within: float = 2.0) -> bytes | None:
        """Send one datagram; its answer, or None if none came `within` seconds."""
        assert self.transport is not None
        self.transport.sendto(data)
        try:
            return await asyncio.wait_for(self.answers.get(), within)
        except TimeoutError:
            return None

    async def who(self, within: float = 2.0) -> str | None:
        answer = await self.ask(b"who", within)
        return answer.split(b" ", 1)[0].decode() if answer is not None else None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def config_of(*groups: str, top: str = "") -> Config:
    text = "groups:\n" + "\n".join(groups) + "\n" + textwrap.dedent(top)
    return load_config_text(text, "test.yaml")


@contextlib.asynccontextmanager
async def running(
    config: Config, clock: Callable[[], float] | None = None
) -> AsyncIterator[Server]:
    server = Server(config, clock=clock) if clock is not None else Server(config)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(grace=1.0)


async def greet(
    port: int, src: str = "127.0.0.1", host: str = "127.0.0.1"
) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect from `src` and read the backend's name; the connection stays open."""
    r, w = await asyncio.open_connection(host, port, local_addr=(src, 0))
    line = await asyncio.wait_for(r.readline(), 5)
    return line.decode().strip(), r, w


async def hello(port: int, src: str = "127.0.0.1", host: str = "127.0.0.1") -> str:
    """Connect, read the backend's name, close."""
    name, _r, w = await greet(port, src, host)
    w.close()
    with contextlib.suppress(ConnectionError, OSError):
        await w.wait_closed()
    return name


def saved_pins(path: Path | str) -> dict[str, dict[int, tuple[str, float]]]:
    """A state file's pins, by group: key -> (backend, seconds left); {} when there is no file
    or it is being replaced. Read with l4lb's reader (`pins.read`: the format's round trip is
    what the state-file tests check)."""
    from l4lb.runtime import pins

    try:
        state = pins.read(str(path))
    except pins.StateFileError:
        return {}
    if state is None:
        return {}
    out: dict[str, dict[int, tuple[str, float]]] = {g: {} for g in state.groups}
    for c in state.chunks:
        for key, b, left in zip(c.keys, c.backends, c.left, strict=True):
            out[c.group][key] = (c.names[b] if c.names is not None else b, left * c.scale)
    return out


async def wait_until(test: Callable[[], bool], within: float = 5.0) -> None:
    """For what the balancer does on its own clock (a sweep, a check): polled, bounded."""
    deadline = time.monotonic() + within
    while not test():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition did not hold in time")
        await asyncio.sleep(0.02)
