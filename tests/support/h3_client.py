"""An HTTP/3 client from a chosen source address (aioquic), for the tests and by hand:

    python -m tests.support.h3_client --source 127.0.5.9 --cafile ca.crt https://localhost:PORT/

Prints the response's body. aioquic's own `connect` binds only a port; this one builds the
same endpoint on an address, so that many 127/8 sources can be many clients."""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from urllib.parse import urlsplit

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import QuicEvent


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.h3 = H3Connection(self._quic)
        self.waiting: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self.bodies: dict[int, bytearray] = {}
        self.status: dict[int, int] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        for ev in self.h3.handle_event(event):
            self._h3_event(ev)

    def _h3_event(self, ev: H3Event) -> None:
        if isinstance(ev, HeadersReceived):
            for k, v in ev.headers:
                if k == b":status":
                    self.status[ev.stream_id] = int(v)
        elif isinstance(ev, DataReceived):
            self.bodies.setdefault(ev.stream_id, bytearray()).extend(ev.data)
        if getattr(ev, "stream_ended", False):
            fut = self.waiting.pop(ev.stream_id, None)
            if fut is not None and not fut.done():
                body = bytes(self.bodies.pop(ev.stream_id, b""))
                fut.set_result((self.status.get(ev.stream_id, 0), body))

    async def get(self, authority: str, path: str) -> tuple[int, bytes]:
        stream = self._quic.get_next_available_stream_id()
        headers = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
        ]
        self.h3.send_headers(stream, headers, end_stream=True)
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.waiting[stream] = fut
        self.transmit()
        return await fut


async def get(
    url: str, source: str, cafile: str | None, connect_to: tuple[str, int] | None = None
) -> tuple[int, bytes]:
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or 443
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=host)
    if cafile:
        config.load_verify_locations(cafile)
    else:
        config.verify_mode = ssl.CERT_NONE
    target = connect_to or ("127.0.0.1" if host == "localhost" else host, port)
    loop = asyncio.get_running_loop()
    conn = QuicConnection(configuration=config)
    transport, proto = await loop.create_datagram_endpoint(
        lambda: H3Client(conn), local_addr=(source, 0)
    )
    try:
        proto.connect(target)
        await proto.wait_connected()
        return await proto.get(parts.netloc, parts.path or "/")
    finally:
        proto.close()
        await proto.wait_closed()
        transport.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--source", default="127.0.0.1")
    ap.add_argument("--cafile")
    ap.add_argument("--timeout", type=float, default=10)
    args = ap.parse_args()

    async def run() -> tuple[int, bytes]:
        return await asyncio.wait_for(get(args.url, args.source, args.cafile), args.timeout)

    status, body = asyncio.run(run())
    sys.stdout.write(body.decode(errors="replace"))
    sys.exit(0 if status == 200 else 1)


if __name__ == "__main__":
    main()
