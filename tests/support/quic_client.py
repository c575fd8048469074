"""A QUIC client (aioquic's connection, driven by hand) that can move: `move(source)` carries
the connection on to a new socket from another address and port, with the next connection ID
the server issued, as a phone leaving Wi-Fi for cellular does (RFC 9000, section 9). aioquic's
own `connect` keeps one socket for the connection's life, so this one owns its socket."""

from __future__ import annotations

import asyncio
import ssl

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import HandshakeCompleted, QuicEvent, StreamDataReceived

from tests.support.quic_server import ALPN


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, client: MovingClient) -> None:
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.client.received(self, data, addr)


class MovingClient:
    def __init__(self, host: str, port: int) -> None:
        self.server = (host, port)
        self.quic = QuicConnection(
            configuration=QuicConfiguration(
                is_client=True,
                alpn_protocols=[ALPN],
                verify_mode=ssl.CERT_NONE,
                server_name="localhost",
            )
        )
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None
        self.protocol: _Socket | None = None
        self.handshake = self.loop.create_future()
        self.answers: dict[int, asyncio.Future[bytes]] = {}
        self.data: dict[int, bytearray] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.moves = 0

    async def _bind(self, source: str) -> None:
        old = self.transport
        protocol = _Socket(self)
        transport, _ = await self.loop.create_datagram_endpoint(
            lambda: protocol, local_addr=(source, 0), remote_addr=self.server
        )
        self.transport, self.protocol = transport, protocol
        if old is not None:
            old.close()

    @property
    def local(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    async def connect(self, source: str, within: float = 10.0) -> None:
        await self._bind(source)
        self.quic.connect(self.server, now=self.loop.time())
        self._pump()
        await asyncio.wait_for(asyncio.shield(self.handshake), within)

    async def move(self, source: str) -> None:
        """Go on from a new socket on `source` (a new port too), with a fresh connection ID."""
        await self._bind(source)
        self.quic.change_connection_id()
        self.moves += 1

    async def ask(self, data: bytes = b"who", within: float = 3.0) -> bytes | None:
        """A request on a new stream; the whole answer, or None if none came `within`."""
        stream = self.quic.get_next_available_stream_id()
        fut: asyncio.Future[bytes] = self.loop.create_future()
        self.answers[stream] = fut
        self.quic.send_stream_data(stream, data, end_stream=True)
        self._pump()
        try:
            return await asyncio.wait_for(fut, within)
        except TimeoutError:
            return None

    def received(self, protocol: _Socket, data: bytes, addr: tuple[str, int]) -> None:
        if protocol is not self.protocol:  # the socket it left: nothing more from there
            return
        self.quic.receive_datagram(data, addr, now=self.loop.time())
        self._pump()

    def _pump(self) -> None:
        while (event := self.quic.next_event()) is not None:
            self._event(event)
        if self.transport is not None:
            for data, _addr in self.quic.datagrams_to_send(now=self.loop.time()):
                self.transport.sendto(data)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        at = self.quic.get_timer()
        if at is not None:
            self.timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.quic.handle_timer(now=self.loop.time())
        self._pump()

    def _event(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted) and not self.handshake.done():
            self.handshake.set_result(None)
        elif isinstance(event, StreamDataReceived):
            self.data.setdefault(event.stream_id, bytearray()).extend(event.data)
            fut = self.answers.get(event.stream_id)
            if event.end_stream and fut is not None and not fut.done():
                fut.set_result(bytes(self.data.pop(event.stream_id)))

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.quic.close()
        self._pump()
        if self.transport is not None:
            self.transport.close()
