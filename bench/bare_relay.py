"""The bare relay: what a TCP proxy on uvloop costs with nothing of l4lb's in it, the reference
`make bench` measures l4lb's overhead against (per new connection, in microseconds of CPU).

A listening Protocol per port; each accepted connection dials the next backend in round robin
(one `create_connection` task, no timeout, no affinity, no counters), reading from the client
is buffered until the backend is connected, then it relays both ways with flow control and half-close.

    python bench/bare_relay.py LISTEN_PORT:BACKEND_PORT[,BACKEND_PORT...] [...]

BARE_DIAL (issue 26, point 3: the ways to dial on uvloop, measured with
`bench/conn_instructions.py --proxy-only --variant bare`): `task` (the default, as above), `drive`
(the same coroutine stepped by a callback on its futures, no Task), `raw` (a non-blocking
connect() and a writer callback, then the connected socket handed to the loop, stepped alike:
uvloop turns a socket into a transport only in a coroutine).

Binds 127.0.0.1 only; prints "ready" once listening.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any

import uvloop

DIALS: set[asyncio.Task[None]] = set()


class Side(asyncio.Protocol):
    transport: asyncio.Transport

    def __init__(self, peer: Side | None = None) -> None:
        self.peer = peer
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and not peer.transport.is_closing():
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and not peer.transport.is_closing():
            if peer.eof:  # both directions are finished
                self.transport.close()
                peer.transport.close()
            else:
                peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and not peer.transport.is_closing():
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()


class Client(Side):
    """The accepted side: reading waits (paused) until the backend is connected."""

    def __init__(self, backends: itertools.cycle[int]) -> None:
        super().__init__()
        self.backends = backends
        self.pending: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.pending.append(data)
        else:
            super().data_received(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        port = next(self.backends)
        if DIAL == "drive":
            drive(self.dial(port))
            return
        if DIAL == "raw":
            self.raw_dial(port)
            return
        task = asyncio.get_running_loop().create_task(self.dial(port))
        DIALS.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(DIALS.discard)

    def raw_dial(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        err = sock.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.transport.close()
            return

        def writable() -> None:
            loop.remove_writer(sock)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                sock.close()
                self.transport.close()
                return
            drive(self.attach(sock))

        loop.add_writer(sock, writable)

    async def attach(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        backend_t, _ = await loop.create_connection(lambda: Side(self), sock=sock)
        self.paired(backend_t)

    async def dial(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            backend_t, _ = await loop.create_connection(lambda: Side(self), "127.0.0.1", port)
        except OSError:
            self.transport.close()
            return
        self.paired(backend_t)

    def paired(self, backend_t: asyncio.Transport) -> None:
        if self.transport.is_closing():
            backend_t.close()
            return
        self.peer = backend_t.get_protocol()  # type: ignore[assignment]
        for data in self.pending:  # what the client sent while the dial went on
            backend_t.write(data)
        self.pending = []


DIAL = os.environ.get("BARE_DIAL", "task")


def drive(coro: Coroutine[Any, Any, None]) -> None:
    """Step a coroutine from the done callbacks of the futures it awaits: a Task's work without
    the Task (its allocation, its first call_soon, its context)."""

    def step(_: object = None) -> None:
        try:
            fut = coro.send(None)
        except StopIteration:
            return
        if fut is None:  # a bare yield (sleep(0))
            asyncio.get_running_loop().call_soon(step)
            return
        fut._asyncio_future_blocking = False
        fut.add_done_callback(step)

    step()


async def main(specs: list[str]) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for spec in specs:
        listen, _, targets = spec.partition(":")
        cycle = itertools.cycle([int(p) for p in targets.split(",")])
        servers.append(
            await loop.create_server(
                functools.partial(Client, cycle), "127.0.0.1", int(listen), backlog=4096
            )
        )
    print("ready", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1:]))
