"""The bare relay: what a TCP proxy on uvloop costs with nothing of l4lb's in it, the reference
`make bench` measures l4lb's overhead against (per new connection, in microseconds of CPU).

A listening Protocol per port; each accepted connection dials the next backend in round robin
(one `create_connection` task, no timeout, no affinity, no counters), reading from the client
is buffered until the backend is connected, then it relays both ways with flow control and half-close.

    python bench/bare_relay.py LISTEN_PORT:BACKEND_PORT[,BACKEND_PORT...] [...]

Binds 127.0.0.1 only; prints "ready" once listening.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import signal
import sys

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
        task = asyncio.get_running_loop().create_task(self.dial(next(self.backends)))
        DIALS.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(DIALS.discard)

    async def dial(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            backend_t, _ = await loop.create_connection(lambda: Side(self), "127.0.0.1", port)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():
            backend_t.close()
            return
        self.peer = backend_t.get_protocol()  # type: ignore[assignment]
        for data in self.pending:  # what the client sent while the dial went on
            backend_t.write(data)
        self.pending = []


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
