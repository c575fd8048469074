"""An HTTP/3 server whose connection IDs carry its QUIC-LB server ID: the smallest server that
l4lb's `quic_lb` can route by connection ID, to try the feature or to start from.

    pip install aioquic                     # beside l4lb, which gives it the codec
    l4lb quic-lb key /etc/l4lb/quic.key     # once; the same file for l4lb and every server
    python contrib/quic-lb/server.py --name web1 --listen 0.0.0.0:4433 \\
        --server-id 0a11 --nonce-length 6 --key-file /etc/l4lb/quic.key \\
        --certificate cert.pem --private-key key.pem

It answers every request with its name (`web1\\n`). aioquic draws its connection IDs at random
and takes only their length, so the connection class its server builds is replaced by one whose
IDs, the first and every one a NEW_CONNECTION_ID frame announces, are the QUIC-LB encoding of
its server ID and a random nonce (`l4lb.core.quiclb.Codec`, the draft's sections 4.3 and 4.4),
as Envoy's, quic-go's and ngtcp2's generators do (docs/reference.md, QUIC-LB). The lengths,
config ID and key must be those of the group's `quic_lb`; the server ID that of the backend.
Prints `ready` once it listens."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

import aioquic.asyncio.server as aioquic_server
from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionId
from aioquic.quic.events import ProtocolNegotiated, QuicEvent

from l4lb.core.quiclb import Codec


def lb_connection(codec: Codec, server_id: bytes) -> type[QuicConnection]:
    """aioquic's connection, its own connection IDs made by `codec` for `server_id`."""

    def new_cid() -> bytes:
        return codec.encode(server_id, os.urandom(codec.nonce_len))

    class LbConnection(QuicConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            first = self._host_cids[0]
            first.cid = new_cid()
            self.host_cid = self._local_initial_source_connection_id = first.cid

        def _replenish_connection_ids(self) -> None:
            while len(self._host_cids) < min(8, self._remote_active_connection_id_limit):
                self._host_cids.append(
                    QuicConnectionId(
                        cid=new_cid(),
                        sequence_number=self._host_cid_seq,
                        stateless_reset_token=os.urandom(16),
                    )
                )
                self._host_cid_seq += 1

    return LbConnection


def install(codec: Codec, server_id: bytes) -> None:
    """Make aioquic's `serve` build connections that issue QUIC-LB IDs."""
    aioquic_server.QuicConnection = lb_connection(codec, server_id)  # type: ignore[misc]


def answering(name: bytes) -> type[QuicConnectionProtocol]:
    class Answer(QuicConnectionProtocol):
        h3: H3Connection | None = None

        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
                self.h3 = H3Connection(self._quic)
            if self.h3 is None:
                return
            for ev in self.h3.handle_event(event):
                if isinstance(ev, HeadersReceived):
                    headers = [(b":status", b"200"), (b"content-type", b"text/plain")]
                    self.h3.send_headers(ev.stream_id, headers)
                    self.h3.send_data(ev.stream_id, name + b"\n", end_stream=True)
            self.transmit()

    return Answer


def codec_of(args: argparse.Namespace, server_id: bytes) -> Codec:
    key = None
    if args.key_file:  # the form `l4lb quic-lb key` writes and quic_lb.key_file reads
        digits = "".join(Path(args.key_file).read_text().split()).lower().removeprefix("0x")
        key = bytes.fromhex(digits)
        if len(key) != 16:
            raise SystemExit(f"{args.key_file}: not a 16-octet key as 32 hex digits")
    return Codec(args.config_id, len(server_id), args.nonce_length, key)


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="what it answers")
    p.add_argument("--listen", type=host_port, required=True, help="HOST:PORT (UDP)")
    p.add_argument("--server-id", required=True, help="its server ID, hex (the backend's)")
    p.add_argument("--nonce-length", type=int, required=True)
    p.add_argument("--config-id", type=int, default=0)
    p.add_argument("--key-file", help="the group's quic_lb.key_file (none: plaintext IDs)")
    p.add_argument("--certificate", required=True)
    p.add_argument("--private-key", required=True)
    args = p.parse_args()
    sid = bytes.fromhex(args.server_id)
    codec = codec_of(args, sid)
    install(codec, sid)
    config = QuicConfiguration(
        is_client=False, alpn_protocols=H3_ALPN, connection_id_length=1 + codec.length
    )
    config.load_cert_chain(args.certificate, args.private_key)
    host, port = args.listen
    await serve(host, port, configuration=config, create_protocol=answering(args.name.encode()))
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
