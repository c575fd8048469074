"""A QUIC server (aioquic) that issues QUIC-LB connection IDs carrying its server ID, as Envoy,
quic-go or ngtcp2 would with a QUIC-LB generator; and a TCP server beside it. Both answer with
the server's name: a QUIC stream gets `NAME` back for whatever it sent, a TCP connection is
greeted with `NAME\\n`. For the tests, and by hand:

    python -m tests.support.quic_server --name a --quic 127.0.0.1:4433 --tcp 127.0.0.1:8443 \\
        --server-id 0a11 --nonce-length 6 [--key 8f95...] [--config-id 0]

The connection IDs are made as contrib/quic-lb/server.py makes them (its `install`); this
server speaks a raw stream protocol, for the tests' hand-driven client, or with `--h3` HTTP/3:
each request is answered `NAME N PORT`, N its number on its QUIC connection and PORT the
source port it came from (so that a client can tell a connection, and a path, that lived on
from new ones). Prints `ready`."""

from __future__ import annotations

import argparse
import asyncio

from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ProtocolNegotiated, QuicEvent, StreamDataReceived

from l4lb.core.quiclb import Codec
from tests.support.backend_server import TLS, addr
from tests.support.contrib import quic_lb_server

ALPN = "l4lb-test"


def who_protocol(name: bytes) -> type[QuicConnectionProtocol]:
    class Who(QuicConnectionProtocol):
        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, StreamDataReceived) and event.end_stream:
                self._quic.send_stream_data(event.stream_id, name, end_stream=True)
                self.transmit()

    return Who


def h3_protocol(name: bytes) -> type[QuicConnectionProtocol]:
    class Who3(QuicConnectionProtocol):
        h3: H3Connection | None = None
        served = 0
        port = 0  # the port of the datagram last received: the path the client is on

        def datagram_received(self, data: bytes | str, addr: tuple[str, int]) -> None:
            self.port = addr[1]
            super().datagram_received(data, addr)  # type: ignore[arg-type]

        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, ProtocolNegotiated):
                self.h3 = H3Connection(self._quic)
            if self.h3 is None:
                return
            for ev in self.h3.handle_event(event):
                if isinstance(ev, HeadersReceived) and ev.stream_ended:
                    self.served += 1
                    body = b"%s %d %d" % (name, self.served, self.port)
                    self.h3.send_headers(
                        ev.stream_id, [(b":status", b"200"), (b"content-length", b"%d" % len(body))]
                    )
                    self.h3.send_data(ev.stream_id, body, end_stream=True)
            self.transmit()

    return Who3


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--quic", type=addr, required=True)
    p.add_argument("--tcp", type=addr)
    p.add_argument("--server-id", required=True, help="hex")
    p.add_argument("--nonce-length", type=int, default=6)
    p.add_argument("--config-id", type=int, default=0)
    p.add_argument("--key", help="the AES-128 key in hex (none: plaintext)")
    p.add_argument("--h3", action="store_true", help="speak HTTP/3")
    a = p.parse_args()
    sid = bytes.fromhex(a.server_id)
    key = bytes.fromhex(a.key) if a.key else None
    codec = Codec(a.config_id, len(sid), a.nonce_length, key)
    quic_lb_server.install(codec, sid)  # (the shipped example's connection class)
    config = QuicConfiguration(
        is_client=False,
        alpn_protocols=H3_ALPN if a.h3 else [ALPN],
        connection_id_length=1 + codec.length,
    )
    config.load_cert_chain(TLS / "cert.pem", TLS / "key.pem")
    name = a.name.encode()
    protocol = h3_protocol(name) if a.h3 else who_protocol(name)
    await serve(a.quic[0], a.quic[1], configuration=config, create_protocol=protocol)
    if a.tcp is not None:

        async def greet(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(name + b"\n")
            await w.drain()
            w.close()

        await asyncio.start_server(greet, a.tcp[0], a.tcp[1])
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
