"""Issue 35: a connection's adoption by an upgrade's new process (`transfer.adopt_conn`), on real
sockets. Seen in CI: an HTTP/1.0 client got its answer but never the backend's FIN (a timeout
after 10 s, about one connection in a thousand across an upgrade): the backend's answer and FIN
arrived while the new process was still making the two transports, before the sides were
paired, and the FIN read then was taken for one passed on before the hand-over."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from l4lb.config import load_config_text
from l4lb.core.connection import HALF_CLOSED, PAIRED
from l4lb.core.routing import Router
from l4lb.dataplane.context import DataPlane
from l4lb.dataplane.relay import ClientSide
from l4lb.dataplane.transfer import adopt_conn
from l4lb.runtime.handform import check_conn

GROUP = "groups: {g: {ports: [80], backends: [{name: b, address: 127.0.0.1, ports: {80: 9}}]}}"


def pair_on_loopback() -> tuple[socket.socket, socket.socket]:
    """Two ends of a real TCP connection on loopback."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        near = socket.create_connection(srv.getsockname())
        far, _ = srv.accept()
    return near, far


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    """The test's own sockets (the clients' and backends'), closed after it."""
    made: list[socket.socket] = []
    yield made
    for s in made:
        s.close()


@pytest.fixture
async def planes() -> AsyncIterator[list[DataPlane]]:
    """The planes made; whatever connection a failed test left open there is aborted, so that
    the loop closes."""
    made: list[DataPlane] = []
    yield made
    for plane in made:
        for cs in list(plane.live):
            assert isinstance(cs, ClientSide)
            for half in (cs, cs.peer):
                if half is not None:
                    half.transport.abort()


def raw_record(eof: list[bool], phase: int) -> dict[str, object]:
    return {
        "group": "g", "port": 80, "peer": ["127.0.0.1", 1], "via": None, "key": 1,
        "backend": "b", "age": 1.0, "connect": 0.001, "idle": 0.5, "bytes_in": 18,
        "bytes_out": 0, "phase": phase, "termination": "", "eof": eof,
        "to_backend": "", "to_client": "", "routed": None,
    }  # fmt: skip


async def adopt(
    socks: list[socket.socket],
    planes: list[DataPlane],
    eof: list[bool],
    phase: int,
    frozen: Callable[[socket.socket, socket.socket], None],
    n: int = 1,
) -> tuple[list[tuple[socket.socket, socket.socket]], DataPlane]:
    """`n` connections adopted at once from their records (as the new process adopts them:
    `Takeover.adopt`), `frozen(client, backend)` having been done by each connection's peers
    while the previous process froze (in the kernel before the new process's transports
    exist): (each connection's client and backend sockets, the plane)."""
    loop = asyncio.get_running_loop()
    router = Router(load_config_text(GROUP).groups[0], loop.time)
    plane = DataPlane({"g": router}, None)
    plane.attach(loop)
    planes.append(plane)
    ends, adopting = [], []
    for _ in range(n):
        client, ours_c = pair_on_loopback()
        ours_b, backend = pair_on_loopback()
        socks += [client, backend]  # (ours_c and ours_b are the adopted transports')
        ends.append((client, backend))
        frozen(client, backend)
        record = check_conn(raw_record(eof, phase), plane.routers)
        adopting.append(adopt_conn(plane, router, record, (ours_c, ours_b)))
    await asyncio.gather(*adopting)
    return ends, plane


async def read_to_eof(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    got = b""
    async with asyncio.timeout(5):
        while chunk := await loop.sock_recv(sock, 4096):
            got += chunk
    return got


@pytest.mark.parametrize("late", [b"", b"the rest of its answer"])
async def test_a_fin_that_arrives_during_the_adoption_is_passed_on(
    socks: list[socket.socket], planes: list[DataPlane], late: bytes
) -> None:
    """What the backend sent while the previous process froze, in the kernel before the new
    process's transports exist: its FIN alone (its answer went before; as seen in CI), or the
    rest of its answer and its FIN. The client gets both, and its connection ends."""

    def answer(_: socket.socket, backend: socket.socket) -> None:
        backend.sendall(late)
        backend.shutdown(socket.SHUT_WR)

    ends, plane = await adopt(socks, planes, [False, False], PAIRED, answer, n=64)
    for client, _ in ends:
        assert await read_to_eof(client) == late
        client.close()  # the client closes in turn: the connection ends, forgotten
    await asyncio.wait_for(plane.wait_quiet(), 5)


async def test_a_fin_passed_on_before_the_hand_over_is_not_passed_again(
    socks: list[socket.socket], planes: list[DataPlane]
) -> None:
    """The record says the backend's FIN went to the client already (half-closed): the new
    process reads it again from the socket, and must not shut the client's side again (nor
    count it); the client's bytes still reach the backend."""

    def fin(_: socket.socket, backend: socket.socket) -> None:
        backend.shutdown(socket.SHUT_WR)

    ((client, backend),), plane = await adopt(socks, planes, [False, True], HALF_CLOSED, fin)
    (cs,) = plane.live
    client.sendall(b"more")
    loop = asyncio.get_running_loop()
    backend.setblocking(False)
    async with asyncio.timeout(5):
        assert await loop.sock_recv(backend, 16) == b"more"
    assert cs.conn.phase == HALF_CLOSED


async def test_a_client_reset_during_the_adoption_ends_its_connection(
    socks: list[socket.socket], planes: list[DataPlane]
) -> None:
    """A client that reset while the previous process froze: its connection ends here (its
    backend closed or reset), nothing is left open and nothing is counted twice."""

    def reset(client: socket.socket, _: socket.socket) -> None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()

    ends, plane = await adopt(socks, planes, [False, False], PAIRED, reset, n=16)
    loop = asyncio.get_running_loop()
    for _, backend in ends:
        backend.setblocking(False)
        with contextlib.suppress(ConnectionResetError):
            async with asyncio.timeout(5):
                assert await loop.sock_recv(backend, 16) == b""
    await asyncio.wait_for(plane.wait_quiet(), 5)
    (router,) = plane.routers.values()
    assert router.by_name["b"].bytes_in == 16 * 18  # each record's 18 bytes, counted once
