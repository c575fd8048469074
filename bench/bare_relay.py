"""The bare relay: what a TCP proxy on uvloop costs with nothing of l4lb's in it, the reference
`make bench` measures l4lb's overhead against (per new connection, in microseconds of CPU).

A listening Protocol per port; each accepted connection dials the next backend in round robin
(one `create_connection` task, no timeout, no affinity, no counters), buffers what the client
sends until the backend is connected, then relays both ways with flow control and half-close.

    python bench/bare_relay.py LISTEN_PORT:BACKEND_PORT[,BACKEND_PORT...] [...]

Binds 127.0.0.1 only; prints "ready" once listening.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys

import uvloop


class Side(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool:
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Client(Side):
    def __init__(self, backends: itertools.cycle[int]) -> None:
        super().__init__()
        self.backends = backends

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self.dial(next(self.backends)))

    async def dial(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, backend = await loop.create_connection(Side, "127.0.0.1", port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        assert self.transport is not None and backend.transport is not None
        if self.transport.is_closing():
            backend.transport.close()
            return
        backend.peer, self.peer = self, backend
        for data in self.pending:  # what the client sent while the dial went on
            backend.transport.write(data)
        for data in backend.pending:  # what the backend sent before this task resumed
            self.transport.write(data)
        self.pending = backend.pending = []


async def main(specs: list[str]) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for spec in specs:
        listen, _, targets = spec.partition(":")
        cycle = itertools.cycle([int(p) for p in targets.split(",")])
        servers.append(
            await loop.create_server(
                lambda c=cycle: Client(c), "127.0.0.1", int(listen), backlog=4096
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
